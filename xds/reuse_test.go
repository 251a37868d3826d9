package xds

import (
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// reuseCluster is a plaintext static cluster: allowed on loopback (inside
// the pod), refused anywhere else.
func reuseCluster(host string, port uint32) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 "c",
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(1e9),
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: "c", Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
				Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
					Address: host, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
				}}},
			}}}},
		}}},
	}
}

func lockedInfo(g *generation, c *clusterv3.Cluster) *resInfo {
	g.mu.Lock()
	defer g.mu.Unlock()
	return g.infoOf(c)
}

// TestCheckedResourcesCarryOver: a generation reuses what the previous one
// checked only for resources of byte-identical content; a changed
// resource, one that failed, and one that merely shares a content key
// with a checked one are checked afresh and refused as before.
func TestCheckedResourcesCarryOver(t *testing.T) {
	log := slog.New(slog.DiscardHandler)
	g1 := newGeneration(nil, log)
	good := lockedInfo(g1, reuseCluster("127.0.0.1", 8080))
	if good.err != nil {
		t.Fatalf("loopback cluster refused: %v", good.err)
	}
	if bad := lockedInfo(g1, reuseCluster("10.0.0.1", 8080)); !errors.Is(bad.err, proxyconfig.ErrPlaintext) {
		t.Fatalf("plaintext cluster to 10.0.0.1: %v, want ErrPlaintext", bad.err)
	}

	g2 := newGeneration(nil, log)
	g2.carryFrom(g1)
	// A new message of the same content: carried over, not checked again.
	if got := lockedInfo(g2, reuseCluster("127.0.0.1", 8080)); got != good {
		t.Error("a byte-identical resource was checked again instead of carried over")
	}
	// Changed content: checked and marshalled afresh.
	changed := lockedInfo(g2, reuseCluster("127.0.0.1", 8081))
	if changed == good || changed.err != nil || changed.hash == good.hash {
		t.Errorf("changed resource: reused %t, error %v, version %s (old %s)", changed == good, changed.err, changed.hash, good.hash)
	}
	// A refused resource is never carried: it is refused again.
	if bad := lockedInfo(g2, reuseCluster("10.0.0.1", 8080)); !errors.Is(bad.err, proxyconfig.ErrPlaintext) {
		t.Errorf("plaintext cluster in the next generation: %v, want ErrPlaintext", bad.err)
	}

	// The content key only finds a candidate: a checked resource filed
	// under the key of a refused one (an FNV collision) is not reused.
	g3 := newGeneration(nil, log)
	g3.carryFrom(g1)
	evil := reuseCluster("10.0.0.2", 8080)
	_, a, err := marshalResource(evil)
	if err != nil {
		t.Fatal(err)
	}
	g3.carried[contentKey{typeURL: a.TypeUrl, sum: fnvSum(a.Value)}] = good
	if got := lockedInfo(g3, evil); got == good || !errors.Is(got.err, proxyconfig.ErrPlaintext) {
		t.Errorf("a resource whose content key collides with a checked one: reused %t, error %v", got == good, got.err)
	}
}

// TestSidecarKeyFollowsOwnInputs: a sidecar whose own inputs did not
// change keeps its key from the previous generation; one whose served
// port, labels, or the mesh's tracing collector changed gets a new key
// and its new configuration.
func TestSidecarKeyFollowsOwnInputs(t *testing.T) {
	cfg := shareProxy(t)
	cfg.Tracing = proxyconfig.Tracing{Collector: "otel.obs.svc.cluster.local:4317", SamplingPercent: 1}
	cfg, err := cfg.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	id := func(sa string) spiffeid.ID { return spiffeid.RequireFromSegments(shareTD, "ns", "shop", "sa", sa) }
	type variant struct {
		target    uint32
		app       string
		collector bool // the collector is a mesh service
		addr      string
	}
	mk := func(v variant) *mesh.Mesh {
		web := &mesh.Workload{Namespace: "shop", Name: "web-0", ServiceAccount: "web", ID: id("web"), Labels: map[string]string{"app": v.app}}
		idle := &mesh.Workload{Namespace: "shop", Name: "idle-0", ServiceAccount: "idle", ID: id("idle")}
		m := &mesh.Mesh{Services: []*mesh.Service{{
			Namespace: "shop", Name: "web", Hostname: "web.shop.svc.cluster.local",
			Ports:     []mesh.Port{{Name: "http", Port: 80, TargetPort: v.target, Protocol: mesh.HTTP}},
			Endpoints: []mesh.Endpoint{{Address: v.addr, Workload: web}},
		}}, Workloads: []*mesh.Workload{idle}}
		if v.collector {
			otel := &mesh.Workload{Namespace: "obs", Name: "otel-0", ServiceAccount: "otel", ID: spiffeid.RequireFromSegments(shareTD, "ns", "obs", "sa", "otel")}
			m.Services = append(m.Services, &mesh.Service{
				Namespace: "obs", Name: "otel", Hostname: "otel.obs.svc.cluster.local",
				Ports:     []mesh.Port{{Name: "grpc", Port: 4317, Protocol: mesh.GRPC}},
				Endpoints: []mesh.Endpoint{{Address: "10.0.9.1", Workload: otel}},
			})
		}
		if err := m.Validate(shareTD); err != nil {
			t.Fatal(err)
		}
		return m
	}
	webNode := func(m *mesh.Mesh) *proxyconfig.Node {
		return parsedNode(t, "sidecar", "10.0.0.1", m.Workload("shop", "web-0"), false)
	}
	idleNode := func(m *mesh.Mesh) *proxyconfig.Node {
		return parsedNode(t, "sidecar", "10.0.0.2", m.Workload("shop", "idle-0"), false)
	}
	key := func(g *generation, n *proxyconfig.Node) string {
		t.Helper()
		k, err := g.shareKey(n)
		if err != nil {
			t.Fatal(err)
		}
		return k
	}
	// fresh is the key a generation with nothing carried gives.
	fresh := func(m *mesh.Mesh, n *proxyconfig.Node) string {
		return key(newGeneration(proxyconfig.NewBuilder(cfg, m, nil), slog.New(slog.DiscardHandler)), n)
	}
	base := variant{target: 8080, app: "web", addr: "10.0.0.1"}
	for _, tc := range []struct {
		name    string
		next    variant
		changed bool // web-0's own resources differ
	}{
		{"nothing", base, false},
		{"served port", variant{target: 9090, app: "web", addr: "10.0.0.1"}, true},
		{"endpoint address", variant{target: 8080, app: "web", addr: "10.0.0.5"}, true},
		{"canonical service label", variant{target: 8080, app: "shop-web", addr: "10.0.0.1"}, true},
		{"tracing collector in the mesh", variant{target: 8080, app: "web", addr: "10.0.0.1", collector: true}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m1, m2 := mk(base), mk(tc.next)
			g1 := newGeneration(proxyconfig.NewBuilder(cfg, m1, nil), slog.New(slog.DiscardHandler))
			k1, i1 := key(g1, webNode(m1)), key(g1, idleNode(m1))
			g2 := newGeneration(proxyconfig.NewBuilder(cfg, m2, nil), slog.New(slog.DiscardHandler))
			g2.carryFrom(g1)
			k2 := key(g2, webNode(m2))
			if want := fresh(m2, webNode(m2)); k2 != want {
				t.Errorf("web-0's key carried over is %s, a fresh generation gives %s", k2, want)
			}
			if (k2 != k1) != tc.changed {
				t.Errorf("web-0's key changed: %t, want %t", k2 != k1, tc.changed)
			}
			if i2 := key(g2, idleNode(m2)); i2 != i1 {
				t.Errorf("idle-0's key changed though its inputs did not")
			}
			_, res, err := g2.snapshot(webNode(m2))
			if err != nil {
				t.Fatal(err)
			}
			want, err := proxyconfig.NewBuilder(cfg, m2, nil).Build(webNode(m2))
			if err != nil {
				t.Fatal(err)
			}
			if !sameResources(res, want) {
				t.Error("web-0 was published resources other than its own in the new mesh")
			}
		})
	}
}

// TestCarriedSidecarKeysMatchFresh: over pairs of random meshes and
// policies, every node's key in a generation carried over from the
// previous one is the key a fresh generation gives it.
func TestCarriedSidecarKeysMatchFresh(t *testing.T) {
	cfg := shareProxy(t)
	log := slog.New(slog.DiscardHandler)
	random := func(seed uint64) (*mesh.Mesh, []*policy.Policy) {
		r := rand.New(rand.NewPCG(seed, seed))
		m := meshtest.Random(r, shareTD)
		if err := m.Validate(shareTD); err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		return m, meshtest.RandomPolicies(r, 3)
	}
	carried := 0
	for seed := range uint64(40) {
		for _, next := range []uint64{seed, seed + 1} {
			m1, p1 := random(seed)
			m2, p2 := random(next)
			g1 := newGeneration(proxyconfig.NewBuilder(cfg, m1, p1), log)
			for i, w := range m1.AllWorkloads() {
				_, _ = g1.shareKey(parsedNode(t, "sidecar", fmt.Sprintf("10.9.0.%d", i+1), w, false))
			}
			g2 := newGeneration(proxyconfig.NewBuilder(cfg, m2, p2), log)
			g2.carryFrom(g1)
			fresh := newGeneration(proxyconfig.NewBuilder(cfg, m2, p2), log)
			for i, w := range m2.AllWorkloads() {
				n := parsedNode(t, "sidecar", fmt.Sprintf("10.9.0.%d", i+1), w, false)
				k, err := g2.shareKey(n)
				kf, errf := fresh.shareKey(n)
				if (err == nil) != (errf == nil) || k != kf {
					t.Fatalf("seeds %d→%d, %s: carried key %q (%v), fresh %q (%v)", seed, next, n.ID, k, err, kf, errf)
				}
				if _, ok := g2.carriedOwns[configKey(n)]; ok {
					carried++
				}
			}
		}
	}
	if carried == 0 {
		t.Fatal("no key was carried over: the test checked nothing")
	}
	t.Logf("%d sidecars had a key from the previous generation", carried)
}
