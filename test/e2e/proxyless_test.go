package e2e

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"fmt"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// proxyless is a grpc-go xDS server (the echo workload) and the mesh that
// describes it.
type proxyless struct {
	mesh     *mesh.Mesh
	server   *mesh.Workload
	client   *mesh.Workload
	target   string
	lis      net.Listener
	certDirs map[string]string
}

// env is a control plane serving xDS on its CA port from a mesh and a
// policy directory, the way `trustmesh serve --mesh --policies` does.
type env struct {
	t         *testing.T
	cp        *controlPlane
	dir       string
	policyDir string
}

// start writes p's mesh and the policies, then starts the control plane.
func start(t *testing.T, p *proxyless, policies string) *env {
	t.Helper()
	e := &env{t: t, dir: tempDir(t)}
	meshDir := filepath.Join(e.dir, "mesh")
	e.policyDir = filepath.Join(e.dir, "policies")
	for _, d := range []string{meshDir, e.policyDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(meshDir, "mesh.yaml"), []byte(p.meshYAML()), 0o600); err != nil {
		t.Fatal(err)
	}
	e.writePolicies(policies)
	e.cp = startControlPlane(t, filepath.Join(e.dir, "data"), func(c *controlplane.Config) {
		c.XDS.MeshDir, c.Authz.PolicyDir, c.Listen.Authz = meshDir, e.policyDir, "127.0.0.1:0"
	})
	return e
}

// push replaces the policies in force with the given YAML documents; the
// control plane sees the change in its policy directory and pushes it.
func (e *env) push(policies ...string) {
	e.t.Helper()
	e.writePolicies(strings.Join(policies, "---\n"))
}

func (e *env) writePolicies(yaml string) {
	e.t.Helper()
	parsePolicies(e.t, yaml) // a test's typo fails here, not as a missing push
	tmp := filepath.Join(e.dir, "policies.yaml.tmp")
	if err := os.WriteFile(tmp, []byte(yaml), 0o600); err != nil {
		e.t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(e.policyDir, "policies.yaml")); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) mint(id spiffeid.ID) *workloadCert { return e.cp.mint(id) }

// meshYAML is p.mesh as mesh files.
func (p *proxyless) meshYAML() string {
	svc, ep := p.mesh.Services[0], p.mesh.Services[0].Endpoints[0]
	return fmt.Sprintf(`apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: %s, namespace: %s}
spec:
  hostname: %s
  ports: [{name: %s, port: %d, protocol: %s}]
  endpoints:
  - {address: %s, pod: %s, spiffeID: %q, labels: {app: %s}, ports: {%s: %d}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: %s, namespace: %s}
spec: {spiffeID: %q, labels: {app: %s}}
`, svc.Name, svc.Namespace, svc.Hostname, svc.Ports[0].Name, svc.Ports[0].Port, svc.Ports[0].Protocol,
		ep.Address, ep.Workload.Name, ep.Workload.ID.String(), ep.Workload.Labels["app"], svc.Ports[0].Name, ep.Ports[svc.Ports[0].Name],
		p.client.Name, p.client.Namespace, p.client.ID.String(), p.client.Labels["app"])
}

func newProxyless(t *testing.T) *proxyless {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint32(lis.Addr().(*net.TCPAddr).Port)
	srv := &mesh.Workload{Namespace: "ns-a", Name: "echo-0", ServiceAccount: "echo",
		ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns-a/sa/echo"), Labels: map[string]string{"app": "echo"}}
	cli := &mesh.Workload{Namespace: "ns-a", Name: "client-0", ServiceAccount: "client",
		ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns-a/sa/client"), Labels: map[string]string{"app": "client"}}
	m := &mesh.Mesh{Services: []*mesh.Service{{
		Namespace: "ns-a", Name: "echo", Hostname: "echo.ns-a.svc.cluster.local",
		Ports:     []mesh.Port{{Name: "grpc", Port: 7070, Protocol: mesh.GRPC}},
		Endpoints: []mesh.Endpoint{{Address: "127.0.0.1", Ports: map[string]uint32{"grpc": port}, Workload: srv}},
	}}, Workloads: []*mesh.Workload{cli}} // the client serves nothing; the mesh must know it
	return &proxyless{mesh: m, server: srv, client: cli, target: "xds:///echo.ns-a.svc.cluster.local:7070", lis: lis, certDirs: map[string]string{}}
}

// serve starts the echo workload as a grpc-go xDS server with the health
// service, its certificates in a cert dir as the agent writes them.
func (p *proxyless) serve(t *testing.T, e *env) {
	t.Helper()
	dir := filepath.Join(e.dir, "server")
	e.mint(p.server.ID).writeDir(t, dir)
	creds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	s, err := grpcxds.NewGRPCServer(grpc.Creds(creds),
		grpcxds.BootstrapContentsForTesting(e.bootstrap(proxyNode("sidecar", "127.0.0.1", p.server, true), dir)))
	if err != nil {
		t.Fatal(err)
	}
	healthpb.RegisterHealthServer(s, health.NewServer())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(p.lis) }()
	t.Cleanup(func() { s.Stop(); <-done })
}

// xdsClient is a grpc-go xDS client of the echo service with the given
// certificate.
func (p *proxyless) xdsClient(t *testing.T, e *env, name string, cert *workloadCert, w *mesh.Workload) healthpb.HealthClient {
	t.Helper()
	dir := filepath.Join(e.dir, name)
	cert.writeDir(t, dir)
	r, err := grpcxds.NewXDSResolverWithConfigForTesting(e.bootstrap(proxyNode("sidecar", "127.0.0.2", w, true), dir))
	if err != nil {
		t.Fatal(err)
	}
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(p.target, grpc.WithTransportCredentials(creds), grpc.WithResolvers(r))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return healthpb.NewHealthClient(conn)
}

func check(c healthpb.HealthClient, wait bool, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	_, err := c.Check(ctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(wait))
	return err
}

// eventually calls until the call returns want, for at most 30 s: the
// server applies a pushed configuration asynchronously.
func eventually(t *testing.T, c healthpb.HealthClient, want codes.Code) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	var err error
	for time.Now().Before(deadline) {
		err = check(c, true, 5*time.Second)
		if status.Code(err) == want {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("calls end with %s (%v), want %s", status.Code(err), err, want)
}

func parsePolicies(t *testing.T, yaml string) []*policy.Policy {
	t.Helper()
	ps, err := policy.ParseYAML("test", []byte(yaml), "default")
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

func allowFrom(principal string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-allow, namespace: ns-a}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [%q]}}]
    to: [{operation: {paths: ["/grpc.health.v1.Health/*"]}}]
`, principal)
}

// TestProxylessEndToEnd runs real grpc-go xDS clients and servers against
// the control plane's xDS server and its CA: mTLS calls succeed; a policy
// change turns them into PermissionDenied and back; a client without a
// certificate, or with one of another trust domain, fails.
func TestProxylessEndToEnd(t *testing.T) {
	p := newProxyless(t)
	e := start(t, p, allowFrom("cluster.local/ns/ns-a/sa/client"))
	p.serve(t, e)
	client := p.xdsClient(t, e, "client", e.mint(p.client.ID), p.client)

	if err := check(client, true, 30*time.Second); err != nil {
		t.Fatalf("mTLS call: %v", err)
	}

	// The policy now admits someone else: the client is denied, by the
	// RBAC filter grpc-go got from the xDS server.
	e.push(allowFrom("cluster.local/ns/ns-a/sa/someone-else"))
	eventually(t, client, codes.PermissionDenied)
	// And back.
	e.push(allowFrom("cluster.local/ns/ns-a/sa/client"))
	eventually(t, client, codes.OK)
	// A DENY policy on the path wins over the ALLOW.
	e.push(allowFrom("cluster.local/ns/ns-a/sa/client"), `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-health, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/grpc.health.v1.Health/Check"]}}]}]
`)
	eventually(t, client, codes.PermissionDenied)

	t.Run("xDS client with another trust domain's certificate", func(t *testing.T) {
		c := p.xdsClient(t, e, "foreign", foreignCert(t, "spiffe://other.example/ns/ns-a/sa/client"), p.client)
		if err := check(c, false, 3*time.Second); status.Code(err) == codes.OK || status.Code(err) == codes.PermissionDenied {
			t.Fatalf("call = %v, want a failure to connect", err)
		}
	})
	addr := p.lis.Addr().String()
	roots := x509.NewCertPool()
	for _, r := range e.cp.roots() {
		roots.AddCert(r)
	}
	for name, cert := range map[string]*workloadCert{
		"direct, no certificate":                     nil,
		"direct, another trust domain's certificate": foreignCert(t, "spiffe://other.example/ns/ns-a/sa/client"),
	} {
		t.Run(name, func(t *testing.T) {
			cfg := &tls.Config{RootCAs: roots, InsecureSkipVerify: true, MinVersion: tls.VersionTLS12} //nolint:gosec // the test is about the server refusing us
			if cert != nil {
				cfg.Certificates = []tls.Certificate{cert.tlsCert()}
			}
			conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			if err := check(healthpb.NewHealthClient(conn), false, 3*time.Second); status.Code(err) != codes.Unavailable {
				t.Fatalf("call = %v, want Unavailable (handshake refused)", err)
			}
		})
	}
}

// foreignCert is a certificate from a CA of another trust domain.
func foreignCert(t testing.TB, id string) *workloadCert {
	t.Helper()
	caKey := newKey(t)
	u, _ := url.Parse("spiffe://other.example")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other"}, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(der)
	key := newKey(t)
	lu, _ := url.Parse(id)
	leafT := &x509.Certificate{SerialNumber: big.NewInt(2), URIs: []*url.URL{lu}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	der, err = x509.CreateCertificate(rand.Reader, leafT, caCert, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &workloadCert{key: key, chain: []*x509.Certificate{leaf}, roots: []*x509.Certificate{caCert}}
}

// proxyNode is the xDS node a proxy of w presents, as the injector's
// bootstrap names it (type~ip~pod.namespace~namespace.svc.cluster.local)
// with the metadata the xDS server reads.
func proxyNode(typ, ip string, w *mesh.Workload, proxyless bool) *corev3.Node {
	labels := map[string]any{}
	for k, v := range w.Labels {
		labels[k] = v
	}
	md := map[string]any{"SERVICE_ACCOUNT": w.ServiceAccount, "NAMESPACE": w.Namespace, "LABELS": labels}
	if proxyless {
		md["GENERATOR"] = "grpc"
	}
	s, err := structpb.NewStruct(md)
	if err != nil {
		panic(err)
	}
	return &corev3.Node{
		Id:       fmt.Sprintf("%s~%s~%s.%s~%s.svc.cluster.local", typ, ip, w.Name, w.Namespace, w.Namespace),
		Metadata: s,
	}
}

// bootstrap is a grpc-go xDS bootstrap for a proxyless workload whose
// agent writes certDir, pointing at the control plane's xDS server.
func (e *env) bootstrap(node *corev3.Node, certDir string) []byte {
	e.t.Helper()
	md := node.GetMetadata().AsMap()
	files := map[string]any{
		"certificate_file":    filepath.Join(certDir, "cert-chain.pem"),
		"private_key_file":    filepath.Join(certDir, "key.pem"),
		"ca_certificate_file": filepath.Join(certDir, "root-cert.pem"),
	}
	provider := map[string]any{"refresh_interval": "0.1s"}
	for k, v := range files {
		provider[k] = v
	}
	b, err := json.Marshal(map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri":      e.cp.addr(),
			"channel_creds":   []any{map[string]any{"type": "tls", "config": files}},
			"server_features": []any{"xds_v3"},
		}},
		"node": map[string]any{"id": node.GetId(), "metadata": md},
		"certificate_providers": map[string]any{
			proxyconfig.ProxylessCertProvider: map[string]any{"plugin_name": "file_watcher", "config": provider},
		},
		"server_listener_resource_name_template": proxyconfig.ProxylessInboundPrefix + "%s",
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}
