package authzd

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/trustmesh/trustmesh/mesh"
)

func TestGatewayIDs(t *testing.T) {
	w := func(ns, name, sa string, labels map[string]string) *mesh.Workload {
		return &mesh.Workload{Namespace: ns, Name: name, ServiceAccount: sa, Labels: labels,
			ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/" + ns + "/sa/" + sa)}
	}
	m := &mesh.Mesh{
		Services: []*mesh.Service{{Namespace: "gw", Name: "gateways", Endpoints: []mesh.Endpoint{
			{Workload: w("gw", "ingress-1", "ingress", map[string]string{"istio": "ingressgateway"})},
			{Workload: w("gw", "ingress-2", "ingress", map[string]string{"istio": "ingressgateway"})},
			{Workload: w("gw", "egress-1", "shared", map[string]string{"istio": "egressgateway"})},
			// Not a gateway, but holds the egress gateway's identity.
			{Workload: w("gw", "debug", "shared", map[string]string{"app": "debug"})},
			// A gateway's labels in another namespace.
			{Workload: w("foo", "fake", "fake", map[string]string{"istio": "ingressgateway"})},
		}}},
		// Workloads that serve no service: a gateway, and a client that
		// shares the egress gateway's identity.
		Workloads: []*mesh.Workload{
			w("gw", "lone-gateway", "lone", map[string]string{"istio": "ingressgateway"}),
			w("gw", "client", "shared", map[string]string{"app": "client"}),
		},
		Gateways: []*mesh.Gateway{
			{Namespace: "gw", Name: "ingress", Kind: mesh.Ingress, Selector: map[string]string{"istio": "ingressgateway"}},
			{Namespace: "gw", Name: "egress", Kind: mesh.Egress, Selector: map[string]string{"istio": "egressgateway"}},
		},
	}
	got := GatewayIDs(m)
	for id, want := range map[string]bool{
		"spiffe://cluster.local/ns/gw/sa/ingress": true,
		"spiffe://cluster.local/ns/gw/sa/lone":    true,
		"spiffe://cluster.local/ns/gw/sa/shared":  false,
		"spiffe://cluster.local/ns/foo/sa/fake":   false,
	} {
		if got.IsGateway(id) != want {
			t.Errorf("IsGateway(%s) = %v, want %v", id, !want, want)
		}
	}
	if len(got) != 2 {
		t.Errorf("GatewayIDs = %v, want two identities", got)
	}
}

const denyBadClients = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-bad-clients, namespace: gw}
spec:
  action: DENY
  rules:
  - from: [{source: {remoteIpBlocks: ["198.51.100.0/24"]}}]
`

// TestRunTrustsTheMeshGateways runs the service with a mesh: a gateway
// destination reads remote.ip from x-envoy-external-address, another
// workload does not.
func TestRunTrustsTheMeshGateways(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.yaml"), []byte(denyBadClients), 0o644); err != nil {
		t.Fatal(err)
	}
	ingress := &mesh.Workload{Namespace: "gw", Name: "ingress-0", ServiceAccount: "ingress", Labels: map[string]string{"istio": "ingressgateway"},
		ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/gw/sa/ingress")}
	m := &mesh.Mesh{
		Services: []*mesh.Service{{Namespace: "gw", Name: "ingress", Endpoints: []mesh.Endpoint{{Workload: ingress}}}},
		Gateways: []*mesh.Gateway{{Namespace: "gw", Name: "ingress", Kind: mesh.Ingress, Selector: ingress.Labels}},
	}
	sock := filepath.Join(t.TempDir(), "authz.sock")
	svc, err := New(Config{Address: "unix://" + sock, PolicyDir: dir, Mesh: mesh.Static{M: m}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- svc.Run(ctx) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	client := authv3.NewAuthorizationClient(conn)
	for _, tt := range []struct {
		dest string
		want codes.Code
	}{
		{"spiffe://cluster.local/ns/gw/sa/ingress", codes.PermissionDenied},
		{"spiffe://cluster.local/ns/gw/sa/web", codes.OK},
	} {
		req := request("/")
		req.Attributes.Destination.Principal = tt.dest
		req.Attributes.Source = &authv3.AttributeContext_Peer{Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1"}}}}
		req.Attributes.Request.Http.Headers = map[string]string{"x-envoy-external-address": "198.51.100.7"}
		resp, err := client.Check(ctx, req, grpc.WaitForReady(true))
		if err != nil {
			t.Fatal(err)
		}
		if got := codes.Code(resp.GetStatus().GetCode()); got != tt.want {
			t.Errorf("%s: %v, want %v", tt.dest, got, tt.want)
		}
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Run: %v", err)
	}
}

type brokenMesh struct{ mesh.Static }

func (brokenMesh) Mesh() (*mesh.Mesh, error) { return nil, errors.New("broken") }

func TestRunFailsOnABrokenMesh(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "p.yaml"), []byte(denyBadClients), 0o644); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(t.TempDir(), "authz.sock")
	svc, err := New(Config{Address: "unix://" + sock, PolicyDir: dir, Mesh: brokenMesh{}})
	if err != nil {
		t.Fatal(err)
	}
	if err := svc.Run(context.Background()); err == nil {
		t.Fatal("Run succeeded without the mesh's gateways")
	}
	if _, err := os.Stat(sock); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the server listened before the mesh loaded: %v", err)
	}
}
