package xds_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"path/filepath"
	"testing"
	"time"

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

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
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
		grpcxds.BootstrapContentsForTesting(e.bootstrap(meshtest.Node("sidecar", "127.0.0.1", p.server, true), dir)))
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
	r, err := grpcxds.NewXDSResolverWithConfigForTesting(e.bootstrap(meshtest.Node("sidecar", "127.0.0.2", w, true), dir))
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

func allowFrom(t *testing.T, principal string) []*policy.Policy {
	return parsePolicies(t, fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-allow, namespace: ns-a}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [%q]}}]
    to: [{operation: {paths: ["/grpc.health.v1.Health/*"]}}]
`, principal))
}

// TestProxylessEndToEnd runs real grpc-go xDS clients and servers against
// the xDS server and the real CA: mTLS calls succeed; a policy change turns
// them into PermissionDenied and back; a client without a certificate, or
// with one of another trust domain, fails.
func TestProxylessEndToEnd(t *testing.T) {
	p := newProxyless(t)
	e := start(t, p.mesh, allowFrom(t, "cluster.local/ns/ns-a/sa/client"))
	p.serve(t, e)
	client := p.xdsClient(t, e, "client", e.mint(p.client.ID), p.client)

	if err := check(client, true, 30*time.Second); err != nil {
		t.Fatalf("mTLS call: %v", err)
	}

	// The policy now admits someone else: the client is denied, by the
	// RBAC filter grpc-go got from the xDS server.
	e.push(nil, allowFrom(t, "cluster.local/ns/ns-a/sa/someone-else"))
	eventually(t, client, codes.PermissionDenied)
	// And back.
	e.push(nil, allowFrom(t, "cluster.local/ns/ns-a/sa/client"))
	eventually(t, client, codes.OK)
	// A DENY policy on the path wins over the ALLOW.
	e.push(nil, append(allowFrom(t, "cluster.local/ns/ns-a/sa/client"), parsePolicies(t, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-health, namespace: istio-system}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/grpc.health.v1.Health/Check"]}}]}]
`)...))
	eventually(t, client, codes.PermissionDenied)

	t.Run("xDS client with another trust domain's certificate", func(t *testing.T) {
		c := p.xdsClient(t, e, "foreign", foreignCert(t, "spiffe://other.example/ns/ns-a/sa/client"), p.client)
		if err := check(c, false, 3*time.Second); status.Code(err) == codes.OK || status.Code(err) == codes.PermissionDenied {
			t.Fatalf("call = %v, want a failure to connect", err)
		}
	})
	addr := p.lis.Addr().String()
	roots := x509.NewCertPool()
	for _, r := range e.cp.Authority.Current().Roots {
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
