package main

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
)

// The generated mesh: namespace bench, HTTP services svc-I on port 8080,
// svc-I's endpoints at 10.(I/250).(I%250).J, client pods of service account
// client, and the proxyless sample's pods grpc-K of the same account.
const (
	meshNS      = "bench"
	servicePort = 8080
	// svc0Cluster is the outbound cluster of svc-0, which the change rounds
	// add endpoints to; sidecars and proxyless clients both name it so.
	svc0Cluster = "outbound|8080||svc-0.bench.svc.cluster.local"
	// svc0Target is the xds:/// target a proxyless client resolves.
	svc0Target = "svc-0.bench.svc.cluster.local:8080"
)

// writeMesh writes the services (svc-0 with extra more endpoints) and,
// when extra is 0, the pods: clients sidecar pods and grpcPods proxyless
// ones. Each file is replaced atomically so serve never reads half.
func writeMesh(dir string, services, clients, grpcPods, extra int) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("xds-load: mesh dir: %w", err)
	}
	var b strings.Builder
	for i := range services {
		fmt.Fprintf(&b, "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Service\nmetadata: {name: svc-%d, namespace: %s}\nspec:\n"+
			"  ports: [{name: http, port: %d, protocol: HTTP}]\n  endpoints:\n", i, meshNS, servicePort)
		n := 2
		if i == 0 {
			n += extra
		}
		for j := range n {
			fmt.Fprintf(&b, "  - {address: %s, pod: svc-%d-%d, spiffeID: spiffe://cluster.local/ns/%s/sa/svc-%d, labels: {app: svc-%d}}\n",
				endpointAddr(i, j), i, j, meshNS, i, i)
		}
		b.WriteString("---\n")
	}
	if err := replace(filepath.Join(dir, "services.yaml"), b.String()); err != nil {
		return err
	}
	if extra > 0 {
		return nil
	}
	b.Reset()
	pod := func(name string) {
		fmt.Fprintf(&b, "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Workload\nmetadata: {name: %s, namespace: %s}\n"+
			"spec: {spiffeID: spiffe://cluster.local/ns/%s/sa/client}\n---\n", name, meshNS, meshNS)
	}
	for i := range clients {
		pod(fmt.Sprintf("client-%d", i))
	}
	for i := range grpcPods {
		pod(fmt.Sprintf("grpc-%d", i))
	}
	return replace(filepath.Join(dir, "clients.yaml"), b.String())
}

func endpointAddr(svc, j int) string { return fmt.Sprintf("10.%d.%d.%d", svc/250, svc%250, j+1) }

// svc0Want is the endpoint set of svc-0 after a change round adds extra
// endpoints, in the form endpointSet gives: sorted "address:port",
// comma-separated.
func svc0Want(extra int) string {
	var s []string
	for j := range 2 + extra {
		s = append(s, fmt.Sprintf("%s:%d", endpointAddr(0, j), servicePort))
	}
	return endpointSet(s)
}

func endpointSet(addrs []string) string {
	slices.Sort(addrs)
	return strings.Join(addrs, ",")
}

func replace(path, content string) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return fmt.Errorf("xds-load: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("xds-load: %w", err)
	}
	return nil
}
