package xds

import (
	"fmt"
	"log/slog"
	"math/rand/v2"
	"testing"

	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

var shareTD = spiffeid.RequireTrustDomainFromString("cluster.local")

func shareProxy(t *testing.T) proxyconfig.Config {
	t.Helper()
	cfg, err := proxyconfig.Config{
		TrustDomain: shareTD, AuthzHost: "127.0.0.1", AuthzPort: 9191,
		AuthzID: spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh"),
	}.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

func parsedNode(t *testing.T, typ, ip string, w *mesh.Workload, proxyless bool) *proxyconfig.Node {
	t.Helper()
	n, err := proxyconfig.ParseNode(meshtest.Node(typ, ip, w, proxyless))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// sameResources reports whether two nodes' resources are equal, type by
// type and in order (warnings, which name the pod, aside).
func sameResources(a, b *proxyconfig.Resources) bool {
	ta, tb := a.ByType(), b.ByType()
	if len(ta) != len(tb) {
		return false
	}
	for typ, ra := range ta {
		rb := tb[typ]
		if len(ra) != len(rb) {
			return false
		}
		for i := range ra {
			if !proto.Equal(ra[i], rb[i]) {
				return false
			}
		}
	}
	return true
}

// TestIdenticalSidecarsShareOneSnapshot: sidecars whose configuration is
// the same share one published snapshot, built once; the replicas of a
// service, whose inbound sides name their own addresses, and pods of
// another service account, do not.
func TestIdenticalSidecarsShareOneSnapshot(t *testing.T) {
	id := func(sa string) spiffeid.ID { return spiffeid.RequireFromSegments(shareTD, "ns", "shop", "sa", sa) }
	web := func(i int) *mesh.Workload {
		return &mesh.Workload{Namespace: "shop", Name: fmt.Sprintf("web-%d", i), ServiceAccount: "web", ID: id("web"), Labels: map[string]string{"app": "web"}}
	}
	m := &mesh.Mesh{Services: []*mesh.Service{{
		Namespace: "shop", Name: "web", Hostname: "web.shop.svc.cluster.local",
		Ports: []mesh.Port{{Name: "http", Port: 8080, Protocol: mesh.HTTP}},
		Endpoints: []mesh.Endpoint{
			{Address: "10.0.0.1", Workload: web(0)},
			{Address: "10.0.0.2", Workload: web(1)},
		},
	}}}
	var clients []*mesh.Workload
	for i := range 3 {
		clients = append(clients, &mesh.Workload{Namespace: "shop", Name: fmt.Sprintf("client-%d", i), ServiceAccount: "client", ID: id("client")})
	}
	other := &mesh.Workload{Namespace: "shop", Name: "other-0", ServiceAccount: "other", ID: id("other")}
	m.Workloads = append(append(m.Workloads, clients...), other)
	if err := m.Validate(shareTD); err != nil {
		t.Fatal(err)
	}
	g := newGeneration(proxyconfig.NewBuilder(shareProxy(t), m, nil), slog.New(slog.DiscardHandler))

	pub := func(w *mesh.Workload) *published {
		t.Helper()
		p, _, err := g.snapshot(parsedNode(t, "sidecar", "10.1.0.1", w, false))
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	c0 := pub(clients[0])
	for _, c := range clients[1:] {
		if pub(c) != c0 {
			t.Errorf("%s does not share %s's snapshot, though their configuration is the same", c.Name, clients[0].Name)
		}
	}
	if pub(other) == c0 {
		t.Error("a pod of another service account shares the clients' snapshot")
	}
	if pub(web(0)) == pub(web(1)) {
		t.Error("two replicas of web share a snapshot, though each accepts HBONE on its own address")
	}
	if pub(web(0)) == c0 {
		t.Error("a pod that serves web shares the snapshot of a pod that serves nothing")
	}
	// client-0..2 share one; other, web-0 and web-1 have their own.
	if len(g.snaps) != 4 {
		t.Errorf("%d snapshots built, want 4", len(g.snaps))
	}
	// A dump names the node it was asked for, not the one the shared
	// snapshot was first built for.
	res, err := g.nodeResources(parsedNode(t, "sidecar", "10.1.0.3", clients[2], false))
	if err != nil {
		t.Fatal(err)
	}
	if want := "workload shop/client-2 serves no port: no inbound listener"; len(res.Warnings) == 0 || res.Warnings[len(res.Warnings)-1] != want {
		t.Errorf("dump warnings %q, want one that ends with %q", res.Warnings, want)
	}
}

// TestSharedSnapshotsNeverDiffer: over random meshes, every node (sidecar,
// gateway, proxyless) that shares a snapshot with another would have been
// built exactly the same resources on its own, and is of the same
// namespace and service account.
func TestSharedSnapshotsNeverDiffer(t *testing.T) {
	cfg := shareProxy(t)
	shared := 0
	for seed := range uint64(12) {
		m := meshtest.Random(rand.New(rand.NewPCG(seed, seed)), shareTD)
		// Pods that serve no service, two for each service account and
		// labels the mesh has, so that some configurations are shared.
		for i, w := range m.AllWorkloads() {
			for j := range 2 {
				m.Workloads = append(m.Workloads, &mesh.Workload{Namespace: w.Namespace, Name: fmt.Sprintf("idle-%d-%d", i, j),
					ServiceAccount: w.ServiceAccount, ID: w.ID, Labels: w.Labels, DataPlaneMode: w.DataPlaneMode})
			}
		}
		if err := m.Validate(shareTD); err != nil {
			t.Fatalf("seed %d: %v", seed, err)
		}
		b := proxyconfig.NewBuilder(cfg, m, nil)
		g := newGeneration(b, slog.New(slog.DiscardHandler))
		first := map[*published]*proxyconfig.Node{}
		for i, w := range m.AllWorkloads() {
			for _, kind := range []struct {
				typ       string
				proxyless bool
			}{{"sidecar", false}, {"sidecar", true}, {"router", false}} {
				n := parsedNode(t, kind.typ, fmt.Sprintf("10.9.%d.%d", i/250, i%250), w, kind.proxyless)
				p, _, err := g.snapshot(n)
				if err != nil || p == nil {
					continue
				}
				prev, ok := first[p]
				if !ok {
					first[p] = n
					continue
				}
				shared++
				if prev.Namespace != n.Namespace || prev.ServiceAccount != n.ServiceAccount {
					t.Fatalf("seed %d: %s and %s share a snapshot across service accounts", seed, prev.ID, n.ID)
				}
				ra, err := b.Build(prev)
				if err != nil {
					t.Fatal(err)
				}
				rb, err := b.Build(n)
				if err != nil {
					t.Fatal(err)
				}
				if !sameResources(ra, rb) {
					t.Fatalf("seed %d: %s and %s share a snapshot but their resources differ", seed, prev.ID, n.ID)
				}
			}
		}
	}
	if shared == 0 {
		t.Fatal("no two nodes shared a snapshot: the test checked nothing")
	}
	t.Logf("%d nodes shared another's snapshot", shared)
}

// TestUnchangedTypeSetsCarryOver: a generation publishes, for a type whose
// resources are byte for byte the previous generation's, the previous
// generation's set itself, so that delta streams holding it are passed
// over (deltaRespond) and its encodings are not made again; a type that
// changed gets a set of its own. A set of the same version whose bytes
// differ (a hash collision) is never taken for it.
func TestUnchangedTypeSetsCarryOver(t *testing.T) {
	id := func(sa string) spiffeid.ID { return spiffeid.RequireFromSegments(shareTD, "ns", "shop", "sa", sa) }
	client := &mesh.Workload{Namespace: "shop", Name: "client-0", ServiceAccount: "client", ID: id("client")}
	meshWith := func(endpoints ...string) *mesh.Mesh {
		s := &mesh.Service{Namespace: "shop", Name: "web", Hostname: "web.shop.svc.cluster.local",
			Ports: []mesh.Port{{Name: "http", Port: 8080, Protocol: mesh.HTTP}}}
		for i, addr := range endpoints {
			s.Endpoints = append(s.Endpoints, mesh.Endpoint{Address: addr, Workload: &mesh.Workload{Namespace: "shop", Name: fmt.Sprintf("web-%d", i),
				ServiceAccount: "web", ID: id("web"), Labels: map[string]string{"app": "web"}}})
		}
		m := &mesh.Mesh{Services: []*mesh.Service{s}, Workloads: []*mesh.Workload{client}}
		if err := m.Validate(shareTD); err != nil {
			t.Fatal(err)
		}
		return m
	}
	publish := func(prev *generation, m *mesh.Mesh) (*generation, *published) {
		t.Helper()
		g := newGeneration(proxyconfig.NewBuilder(shareProxy(t), m, nil), slog.New(slog.DiscardHandler))
		g.carryFrom(prev)
		p, _, err := g.snapshot(parsedNode(t, "sidecar", "10.1.0.1", client, false))
		if err != nil {
			t.Fatal(err)
		}
		return g, p
	}
	g1, p1 := publish(nil, meshWith("10.0.0.1"))
	g2, p2 := publish(g1, meshWith("10.0.0.1", "10.0.0.2"))
	for _, typ := range []string{resource.ClusterType, resource.ListenerType, resource.RouteType} {
		if p1.types[typ] == nil || p2.types[typ] != p1.types[typ] {
			t.Errorf("%s: a new set after a push that changed only endpoints", typ)
		}
	}
	if p2.types[resource.EndpointType] == p1.types[resource.EndpointType] {
		t.Fatal("endpoints: the previous set after a push that changed them")
	}
	// Carried over two pushes, and from a generation that carried it.
	_, p3 := publish(g2, meshWith("10.0.0.1", "10.0.0.2"))
	if p3.types[resource.ClusterType] != p1.types[resource.ClusterType] || p3.types[resource.EndpointType] != p2.types[resource.EndpointType] {
		t.Error("a set unchanged since the previous push was not kept")
	}

	// A collision: the previous generation's set has the version of the
	// next one's but other bytes.
	eds := p2.types[resource.EndpointType]
	forged := &typeSet{version: eds.version, names: eds.names, anys: map[string]*anypb.Any{}, versions: eds.versions}
	for name, a := range eds.anys {
		forged.anys[name] = &anypb.Any{TypeUrl: a.GetTypeUrl(), Value: append([]byte{0}, a.GetValue()...)}
	}
	g4 := newGeneration(proxyconfig.NewBuilder(shareProxy(t), meshWith("10.0.0.1", "10.0.0.2"), nil), slog.New(slog.DiscardHandler))
	g4.carriedSets = map[typeSetKey]*typeSet{{resource.EndpointType, eds.version}: forged}
	p4, _, err := g4.snapshot(parsedNode(t, "sidecar", "10.1.0.1", client, false))
	if err != nil {
		t.Fatal(err)
	}
	if p4.types[resource.EndpointType] == forged {
		t.Error("a set of the same version but other bytes was taken for the new one")
	}
}
