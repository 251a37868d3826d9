package xds_test

import (
	"context"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/resolver"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
)

// differentialPolicies are policy sets over the fields both back ends
// support for gRPC; %d is the server's port. Consecutive sets differ, so
// that a call served under the previous set would show.
var differentialPolicies = []string{
	`metadata: {name: a, namespace: ns-a}
spec:
  action: ALLOW
  rules: [{from: [{source: {principals: ["cluster.local/ns/ns-a/sa/client"]}}], to: [{operation: {paths: ["/svc.A/*"]}}]}]`,
	`metadata: {name: deny-ns-b, namespace: ns-a}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["ns-b"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-all, namespace: ns-a}
spec: {rules: [{}]}`,
	`metadata: {name: alice, namespace: ns-a}
spec:
  selector: {matchLabels: {app: echo}}
  rules: [{when: [{key: "request.headers[x-user]", values: ["alice"]}]}]`,
	`metadata: {name: get-only, namespace: ns-a}
spec:
  rules:
  - to: [{operation: {methods: ["GET"]}}]
  - to: [{operation: {notPaths: ["/svc.B/*"]}}]`,
	`metadata: {name: suffix, namespace: istio-system}
spec:
  rules: [{from: [{source: {notPrincipals: ["cluster.local/ns/ns-a/sa/other"]}}], to: [{operation: {paths: ["*/Get"]}}]}]`,
	`metadata: {name: no-delete-from-loopback, namespace: ns-a}
spec:
  action: DENY
  rules: [{from: [{source: {ipBlocks: ["127.0.0.1/32"]}}], to: [{operation: {paths: ["/svc.A/Delete"]}}]}]`,
	`metadata: {name: ports-and-sa, namespace: ns-a}
spec:
  rules: [{from: [{source: {serviceAccounts: ["ns-b/client"], trustDomains: ["cluster.local"]}}], to: [{operation: {ports: ["%d"]}}]}]`,
	`metadata: {name: elsewhere, namespace: ns-a}
spec:
  selector: {matchLabels: {app: other}}
  rules: [{}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: no-debug, namespace: ns-a}
spec:
  action: DENY
  rules: [{when: [{key: "request.headers[x-debug]", values: ["*"]}, {key: "destination.port", values: ["%d"]}]}]`,
	`metadata: {name: nothing, namespace: ns-a}
spec: {selector: {matchLabels: {app: echo}}}`,
}

type caller struct {
	w     *mesh.Workload
	r     resolver.Builder
	creds credentials.TransportCredentials
	conn  *grpc.ClientConn
}

// TestDifferentialRBAC compares, over policy sets and requests, the RBAC
// that grpc-go enforces (compiled by authz/rbac and pushed over xDS) with
// the authz engine's Rego decision for the same request.
func TestDifferentialRBAC(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint32(lis.Addr().(*net.TCPAddr).Port)
	echo := &mesh.Workload{Namespace: "ns-a", Name: "echo-0", ServiceAccount: "echo",
		ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns-a/sa/echo"), Labels: map[string]string{"app": "echo"}}
	// The callers serve nothing; the mesh must know them to configure them.
	var callerPods []*mesh.Workload
	for i, id := range []string{"ns-a/client", "ns-a/other", "ns-b/client"} {
		ns, sa, _ := strings.Cut(id, "/")
		callerPods = append(callerPods, &mesh.Workload{Namespace: ns, Name: fmt.Sprintf("caller-%d", i), ServiceAccount: sa,
			ID: spiffeid.RequireFromSegments(td, "ns", ns, "sa", sa)})
	}
	m := &mesh.Mesh{Services: []*mesh.Service{{
		Namespace: "ns-a", Name: "echo", Hostname: "echo.ns-a.svc.cluster.local",
		Ports:     []mesh.Port{{Name: "grpc", Port: 7070, Protocol: mesh.GRPC}},
		Endpoints: []mesh.Endpoint{{Address: "127.0.0.1", Ports: map[string]uint32{"grpc": port}, Workload: echo}},
	}}, Workloads: callerPods}
	e := start(t, m, nil)

	// The server accepts every method.
	dir := filepath.Join(e.dir, "echo")
	e.mint(echo.ID).writeDir(t, dir)
	screds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := grpcxds.NewGRPCServer(grpc.Creds(screds),
		grpcxds.BootstrapContentsForTesting(e.bootstrap(meshtest.Node("sidecar", "127.0.0.1", echo, true), dir)),
		grpc.UnknownServiceHandler(func(_ any, s grpc.ServerStream) error {
			if err := s.RecvMsg(&emptypb.Empty{}); err != nil {
				return err
			}
			return s.SendMsg(&emptypb.Empty{})
		}))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { defer close(done); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-done })

	var callers []*caller
	for _, w := range callerPods {
		cdir := filepath.Join(e.dir, w.Name)
		e.mint(w.ID).writeDir(t, cdir)
		r, err := grpcxds.NewXDSResolverWithConfigForTesting(e.bootstrap(meshtest.Node("sidecar", "127.0.0.2", w, true), cdir))
		if err != nil {
			t.Fatal(err)
		}
		ccreds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
		if err != nil {
			t.Fatal(err)
		}
		callers = append(callers, &caller{w: w, r: r, creds: ccreds})
	}
	t.Cleanup(func() {
		for _, c := range callers {
			if c.conn != nil {
				c.conn.Close()
			}
		}
	})
	echoNode := meshtest.Node("sidecar", "127.0.0.1", echo, true).GetId()

	invoke := func(c *caller, path string, md metadata.MD) codes.Code {
		ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(context.Background(), md), 20*time.Second)
		defer cancel()
		return status.Code(c.conn.Invoke(ctx, path, &emptypb.Empty{}, &emptypb.Empty{}, grpc.WaitForReady(true)))
	}
	paths := []string{"/svc.A/Get", "/svc.A/Delete", "/svc.B/Get"}
	headers := []metadata.MD{{}, metadata.Pairs("x-user", "alice"), metadata.Pairs("x-debug", "1")}
	compared, denied := 0, 0
	for i, spec := range differentialPolicies {
		ps := parsePolicies(t, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"+strings.ReplaceAll(spec, "%d", fmt.Sprint(port)))
		set, err := engine.Build(context.Background(), engine.SetConfig{RootNamespace: "istio-system", Policies: ps})
		if err != nil {
			t.Fatalf("policy set %d: %v", i, err)
		}
		e.push(nil, ps)
		// Once the server has acknowledged the set, new connections get
		// it: every caller reconnects.
		deadline := time.Now().Add(30 * time.Second)
		for !e.srv.Synced(echoNode) {
			if time.Now().After(deadline) {
				t.Fatalf("policy set %d never reached the server", i)
			}
			time.Sleep(5 * time.Millisecond)
		}
		for _, c := range callers {
			if c.conn != nil {
				c.conn.Close()
			}
			if c.conn, err = grpc.NewClient("xds:///echo.ns-a.svc.cluster.local:7070", grpc.WithTransportCredentials(c.creds), grpc.WithResolvers(c.r)); err != nil {
				t.Fatal(err)
			}
		}
		for _, c := range callers {
			for _, path := range paths {
				for _, md := range headers {
					got := invoke(c, path, md)
					if got != codes.OK && got != codes.PermissionDenied {
						t.Fatalf("policy set %d: %s %s %v: code %s", i, c.w.ID, path, md, got)
					}
					d, err := set.Check(context.Background(), checkRequest(c.w.ID, echo, path, port, md))
					if err != nil {
						t.Fatalf("engine: %v", err)
					}
					if d.Allowed != (got == codes.OK) {
						t.Errorf("policy set %d: %s calling %s with %v: grpc-go RBAC says %s, the engine allowed=%t (%s %s)",
							i, c.w.ID, path, md, got, d.Allowed, d.Reason, d.Policy)
					}
					compared++
					if got == codes.PermissionDenied {
						denied++
					}
				}
			}
		}
	}
	t.Logf("%d decisions compared over %d policy sets, %d denied", compared, len(differentialPolicies), denied)
	if denied == 0 || denied == compared {
		t.Fatal("every request got the same decision: the comparison shows nothing")
	}
}

// checkRequest is the CheckRequest Envoy would send for the same call.
func checkRequest(src spiffeid.ID, dst *mesh.Workload, path string, port uint32, md metadata.MD) *authv3.CheckRequest {
	h := map[string]string{"content-type": "application/grpc"}
	for k, v := range md {
		h[k] = strings.Join(v, ",")
	}
	addr := func(p uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: "127.0.0.1", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: p}}}}
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: src.String(), Address: addr(40000)},
		Destination: &authv3.AttributeContext_Peer{Principal: dst.ID.String(), Labels: dst.Labels, Address: addr(port)},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "POST", Path: path, Host: "echo.ns-a.svc.cluster.local:7070", Headers: h, Protocol: "HTTP/2",
		}},
	}}
}
