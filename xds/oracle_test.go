package xds_test

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/trustmesh/trustmesh/authz/conformance"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/rbac"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/test/envoyrbac"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// oracleSample bounds the policy sets of the Istio-oracle corpus that
// TestOracleSampleGRPC pushes; each is checked with several requests.
const oracleSample = 25

// TestOracleSampleGRPC is the second check of the differential test against
// Istio (authz/conformance): test/envoyrbac, our own evaluator, decides the
// corpus's RBAC cases there, so here a sample of the corpus's policy sets is
// compiled by authz/rbac, pushed over xDS to a real grpc-go server, and
// grpc-go's RBAC must decide each call as test/envoyrbac decides it.
//
// The sample keeps what grpc-go can enforce (proxyconfig.CheckProxyless:
// no connection.sni, whose grpc-go matcher only matches "", and no
// CUSTOM) and leaves out hosts and user-agent, which grpc-go sets itself.
// Calls go over loopback, so addresses and ports are the real ones.
func TestOracleSampleGRPC(t *testing.T) {
	cases, err := conformance.ReadFile("../authz/testdata/istio-oracle/corpus-seed1.jsonl.gz")
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := uint32(lis.Addr().(*net.TCPAddr).Port)
	dest := &mesh.Workload{Namespace: "foo", Name: "web-0", ServiceAccount: "web",
		ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/foo/sa/web"), Labels: map[string]string{"app": "web", "version": "v1"}}
	m := &mesh.Mesh{Services: []*mesh.Service{{
		Namespace: "foo", Name: "web", Hostname: "web.foo.svc.cluster.local",
		Ports:     []mesh.Port{{Name: "grpc", Port: 8080, Protocol: mesh.GRPC}},
		Endpoints: []mesh.Endpoint{{Address: "127.0.0.1", Ports: map[string]uint32{"grpc": port}, Workload: dest}},
	}}}
	e := start(t, m, nil)

	dir := filepath.Join(e.dir, "web")
	e.mint(dest.ID).writeDir(t, dir)
	screds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := grpcxds.NewGRPCServer(grpc.Creds(screds),
		grpcxds.BootstrapContentsForTesting(e.bootstrap(meshtest.Node("sidecar", "127.0.0.1", dest, true), dir)),
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
	destNode := meshtest.Node("sidecar", "127.0.0.1", dest, true).GetId()

	callers := map[string]*caller{}
	var known []*mesh.Workload
	t.Cleanup(func() {
		for _, c := range callers {
			if c.conn != nil {
				c.conn.Close()
			}
		}
	})
	callerFor := func(principal string) *caller {
		if c, ok := callers[principal]; ok {
			return c
		}
		id := spiffeid.RequireFromString(principal)
		segs := strings.Split(id.Path(), "/") // "", "ns", NS, "sa", SA
		w := &mesh.Workload{Namespace: segs[2], Name: fmt.Sprintf("caller-%d", len(callers)), ServiceAccount: segs[4], ID: id}
		// The xDS server configures only workloads the mesh knows.
		known = append(known, w)
		e.push(&mesh.Mesh{Services: m.Services, Workloads: slices.Clone(known)}, nil)
		cdir := filepath.Join(e.dir, w.Name)
		e.mint(id).writeDir(t, cdir)
		r, err := grpcxds.NewXDSResolverWithConfigForTesting(e.bootstrap(meshtest.Node("sidecar", "127.0.0.2", w, true), cdir))
		if err != nil {
			t.Fatal(err)
		}
		ccreds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
		if err != nil {
			t.Fatal(err)
		}
		c := &caller{w: w, r: r, creds: ccreds}
		callers[principal] = c
		return c
	}

	compared, denied, sets := 0, 0, 0
	for _, g := range sampleGroups(t, cases) {
		if sets == oracleSample {
			break
		}
		sets++
		e.push(nil, g.policies)
		deadline := time.Now().Add(30 * time.Second)
		for !e.srv.Synced(destNode) {
			if time.Now().After(deadline) {
				t.Fatalf("policy set of case %d never reached the server", g.cases[0].N)
			}
			time.Sleep(5 * time.Millisecond)
		}
		fs, err := rbac.Build(policy.Applicable(g.policies, "istio-system", dest.Namespace, dest.Labels), false)
		if err != nil {
			t.Fatal(err)
		}
		for _, c := range callers {
			if c.conn != nil {
				c.conn.Close()
				c.conn = nil
			}
		}
		for _, cs := range g.cases {
			c := callerFor(cs.Request.Principal)
			if c.conn == nil {
				if c.conn, err = grpc.NewClient("xds:///web.foo.svc.cluster.local:8080", grpc.WithTransportCredentials(c.creds), grpc.WithResolvers(c.r)); err != nil {
					t.Fatal(err)
				}
			}
			path := grpcPath(cs.Request.Path)
			md := metadata.MD{}
			for _, h := range []string{"x-user", "x-env"} {
				if v, ok := cs.Request.Headers[h]; ok {
					md.Set(h, v)
				}
			}
			ctx, cancel := context.WithTimeout(metadata.NewOutgoingContext(context.Background(), md), 20*time.Second)
			got := status.Code(c.conn.Invoke(ctx, path, &emptypb.Empty{}, &emptypb.Empty{}, grpc.WaitForReady(true)))
			cancel()
			if got != codes.OK && got != codes.PermissionDenied {
				t.Fatalf("case %d: %s %s: code %s", cs.N, cs.Request.Principal, path, got)
			}
			want, err := evaluate(fs, cs.Request.Principal, path, port, md)
			if err != nil {
				t.Fatal(err)
			}
			if want != (got == codes.OK) {
				t.Errorf("seed %d case %d: %s calling %s with %v: grpc-go RBAC says %s, test/envoyrbac allowed=%t\n  policies: %s",
					cs.Seed, cs.N, cs.Request.Principal, path, md, got, want, cs.Policies)
			}
			compared++
			if got == codes.PermissionDenied {
				denied++
			}
		}
	}
	t.Logf("%d calls compared over %d policy sets of the corpus, %d denied", compared, sets, denied)
	if compared < 50 || denied == 0 || denied == compared {
		t.Fatalf("%d calls, %d denied: the sample shows nothing", compared, denied)
	}
}

// group is a policy set of the corpus with the cases grpc-go can serve.
type group struct {
	policies []*policy.Policy
	cases    []*conformance.Case
}

// sampleGroups picks, in corpus order, the policy sets that grpc-go can
// enforce and that decide something for foo/web, with their HTTP cases from
// a peer in this trust domain, all sent to foo/web.
func sampleGroups(t *testing.T, cases []conformance.Case) []*group {
	var out []*group
	var cur *group
	raw := ""
	for i := range cases {
		c := &cases[i]
		if string(c.Policies) != raw {
			raw, cur = string(c.Policies), nil
			if strings.Contains(raw, "hosts") || strings.Contains(raw, "user-agent") {
				continue
			}
			ps := parseCorpusPolicies(t, c)
			ok := len(policy.Applicable(ps, "istio-system", "foo", map[string]string{"app": "web", "version": "v1"})) > 0
			for _, p := range ps {
				ok = ok && proxyconfig.CheckProxyless(p) == nil
			}
			if ok {
				cur = &group{policies: ps}
				out = append(out, cur)
			}
		}
		if cur == nil || c.Request.TCP || !strings.HasPrefix(c.Request.Principal, "spiffe://cluster.local/") {
			continue
		}
		cur.cases = append(cur.cases, c)
	}
	var kept []*group
	for _, g := range out {
		if len(g.cases) > 0 {
			kept = append(kept, g)
		}
	}
	return kept
}

func parseCorpusPolicies(t *testing.T, c *conformance.Case) []*policy.Policy {
	var objs []json.RawMessage
	if err := json.Unmarshal(c.Policies, &objs); err != nil {
		t.Fatal(err)
	}
	docs := make([]string, len(objs))
	for i, o := range objs {
		docs[i] = string(o)
	}
	ps, err := policy.ParseYAML(fmt.Sprintf("case %d", c.N), []byte(strings.Join(docs, "\n---\n")), "default")
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

// grpcPath turns a corpus path into a gRPC method path: no query, at least
// a service and a method.
func grpcPath(p string) string {
	p, _, _ = strings.Cut(p, "?")
	if strings.Count(strings.Trim(p, "/"), "/") == 0 {
		p = "/svc" + strings.TrimSuffix(p, "/") + "/Call"
	}
	return strings.TrimSuffix(p, "/")
}

// evaluate is test/envoyrbac's decision on the call as grpc-go's RBAC sees
// it: DENY filter, then ALLOW filter.
func evaluate(fs *rbac.Filters, principal, path string, port uint32, md metadata.MD) (bool, error) {
	loop := netip.MustParseAddr("127.0.0.1")
	r := &envoyrbac.Request{HTTP: true, Principal: principal, DirectRemoteIP: loop, RemoteIP: loop, DestinationIP: loop, DestPort: port,
		Headers: map[string]string{":method": "POST", ":path": path, ":authority": "web.foo.svc.cluster.local:8080", "content-type": "application/grpc"}}
	for k, v := range md {
		r.Headers[k] = strings.Join(v, ",")
	}
	for _, rules := range [...]*rbacv3.RBAC{fs.Deny, fs.Allow} {
		ok, err := envoyrbac.Allows(rules, r)
		if err != nil || !ok {
			return false, err
		}
	}
	return true, nil
}
