package xds

import (
	"context"
	"fmt"
	"maps"
	"math/rand/v2"
	"net"
	"slices"
	"sort"
	"strconv"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	serverv3 "github.com/envoyproxy/go-control-plane/pkg/server/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/test/bufconn"
	"google.golang.org/protobuf/types/known/anypb"
)

// deltaPub is a configuration of endpoints only: name -> version.
func deltaPub(resources map[string]string) *published {
	ts := &typeSet{anys: map[string]*anypb.Any{}, versions: map[string]string{}}
	for name, v := range resources {
		ts.names = append(ts.names, name)
		ts.anys[name] = &anypb.Any{TypeUrl: resource.EndpointType, Value: []byte(name + "@" + v)}
		ts.versions[name] = v
	}
	sort.Strings(ts.names)
	ts.version = typeVersion(ts.names, ts.versions)
	return &published{types: map[string]*typeSet{resource.EndpointType: ts}}
}

// deltaServe runs go-control-plane's delta server over the cache, with
// the stream callbacks the cache needs, and returns a client.
func deltaServe(t *testing.T, c *cache) discoveryv3.AggregatedDiscoveryServiceClient {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	ads := serverv3.NewServer(ctx, c, serverv3.CallbackFuncs{
		StreamDeltaRequestFunc: func(id int64, req *discoveryv3.DeltaDiscoveryRequest) error {
			c.deltaRequest(id, req)
			return nil
		},
		DeltaStreamClosedFunc: func(id int64, _ *corev3.Node) { c.deltaClosed(id) },
	})
	lis := bufconn.Listen(1 << 20)
	srv := grpc.NewServer()
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(srv, ads)
	go func() { _ = srv.Serve(lis) }()
	conn, err := grpc.NewClient("passthrough:///bufnet",
		grpc.WithContextDialer(func(ctx context.Context, _ string) (net.Conn, error) { return lis.DialContext(ctx) }),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = conn.Close()
		cancel()
		srv.Stop()
		c.stop()
	})
	return discoveryv3.NewAggregatedDiscoveryServiceClient(conn)
}

type deltaTestStream struct {
	t    *testing.T
	name string
	s    discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
	got  chan *discoveryv3.DeltaDiscoveryResponse
}

func openDelta(t *testing.T, ctx context.Context, client discoveryv3.AggregatedDiscoveryServiceClient, name, node string, subscribe []string) *deltaTestStream {
	t.Helper()
	s, err := client.DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ds := &deltaTestStream{t: t, name: name, s: s, got: make(chan *discoveryv3.DeltaDiscoveryResponse, 16)}
	go func() {
		for {
			resp, err := s.Recv()
			if err != nil {
				close(ds.got)
				return
			}
			ds.got <- resp
		}
	}()
	ds.send(&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: node}, TypeUrl: resource.EndpointType, ResourceNamesSubscribe: subscribe})
	return ds
}

func (d *deltaTestStream) send(req *discoveryv3.DeltaDiscoveryRequest) {
	d.t.Helper()
	if req.TypeUrl == "" {
		req.TypeUrl = resource.EndpointType
	}
	if err := d.s.Send(req); err != nil {
		d.t.Fatalf("%s: %v", d.name, err)
	}
}

// expect receives one response, acknowledges it, and checks it holds
// exactly the resources (name@version) and removals given.
func (d *deltaTestStream) expect(what string, upserts, removed []string) {
	d.t.Helper()
	var resp *discoveryv3.DeltaDiscoveryResponse
	select {
	case resp = <-d.got:
	case <-time.After(5 * time.Second):
		d.t.Fatalf("%s, %s: no response, want %v removing %v", d.name, what, upserts, removed)
	}
	if resp == nil {
		d.t.Fatalf("%s, %s: the stream ended", d.name, what)
	}
	var got []string
	for _, r := range resp.GetResources() {
		if string(r.GetResource().GetValue()) != r.GetName()+"@"+r.GetVersion() {
			d.t.Fatalf("%s, %s: resource %s at %s carries %q", d.name, what, r.GetName(), r.GetVersion(), r.GetResource().GetValue())
		}
		got = append(got, r.GetName()+"@"+r.GetVersion())
	}
	slices.Sort(got)
	gotRemoved := slices.Sorted(slices.Values(resp.GetRemovedResources()))
	if !slices.Equal(got, upserts) || !slices.Equal(gotRemoved, removed) {
		d.t.Fatalf("%s, %s: sent %v removing %v, want %v removing %v", d.name, what, got, gotRemoved, upserts, removed)
	}
	d.send(&discoveryv3.DeltaDiscoveryRequest{ResponseNonce: resp.GetNonce()})
}

// quiet checks that nothing is sent for a while.
func (d *deltaTestStream) quiet(what string) {
	d.t.Helper()
	select {
	case resp := <-d.got:
		d.t.Fatalf("%s, %s: sent %v removing %v, want nothing", d.name, what, resp.GetResources(), resp.GetRemovedResources())
	case <-time.After(200 * time.Millisecond):
	}
}

// TestDeltaSharedGenerations: streams whose clients acknowledged one
// shared configuration G are sent, on the push of G', exactly what
// changed and what was removed (a removed service's endpoints), from one
// diff shared by them all; each stream's state is a pointer to the
// configuration it holds; and a stream that unsubscribes and subscribes
// again does not change what another stream at the same G is sent,
// through go-control-plane's delta server, which writes to the map a
// response hands it when a request unsubscribes.
func TestDeltaSharedGenerations(t *testing.T) {
	c := newCache(0, 0, nil)
	client := deltaServe(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()

	g := deltaPub(map[string]string{"a": "1", "b": "1", "c": "1"})
	nodes := []string{"n1", "n2", "n3", "n4"}
	for _, n := range nodes {
		if err := c.set(n, g); err != nil {
			t.Fatal(err)
		}
	}
	all := []string{"a@1", "b@1", "c@1"}
	named1 := openDelta(t, ctx, client, "named-1", "n1", []string{"a", "b", "c"})
	named1.expect("first answer", all, nil)
	named2 := openDelta(t, ctx, client, "named-2", "n2", []string{"a", "b", "c"})
	named2.expect("first answer", all, nil)
	wild1 := openDelta(t, ctx, client, "wildcard-1", "n3", nil)
	wild1.expect("first answer", all, nil)
	wild2 := openDelta(t, ctx, client, "wildcard-2", "n4", []string{"*"})
	wild2.expect("first answer", all, nil)

	// named-1 drops b, takes it back (it must be sent again: the client
	// forgot it), and drops it again; no other stream is sent anything.
	named1.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesUnsubscribe: []string{"b"}})
	named1.quiet("after unsubscribing b")
	named1.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"b"}})
	named1.expect("subscribing b again", []string{"b@1"}, nil)
	named1.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesUnsubscribe: []string{"b"}})
	named1.quiet("after unsubscribing b again")
	for _, s := range []*deltaTestStream{named2, wild1, wild2} {
		s.quiet("while named-1 changed its subscription")
	}

	// G -> G': a changes, b (a removed service) goes, d is new.
	g2 := deltaPub(map[string]string{"a": "2", "c": "1", "d": "1"})
	for _, n := range nodes {
		if err := c.set(n, g2); err != nil {
			t.Fatal(err)
		}
	}
	wild1.expect("the push", []string{"a@2", "d@1"}, []string{"b"})
	wild2.expect("the push", []string{"a@2", "d@1"}, []string{"b"})
	named2.expect("the push", []string{"a@2"}, []string{"b"})
	named1.expect("the push", []string{"a@2"}, nil)
	named2.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"d"}})
	named2.expect("subscribing d", []string{"d@1"}, nil)
	named1.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"b"}})
	named1.quiet("subscribing b, which is gone")

	// A wildcard stream that unsubscribes a name it named explicitly is
	// sent it again (Envoy's xDS protocol); the other is not.
	wild2.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{"c"}})
	wild2.quiet("naming c, which it holds")
	wild2.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesUnsubscribe: []string{"c"}})
	wild2.expect("unsubscribing c while wildcard", []string{"c@1"}, nil)
	wild1.quiet("while wildcard-2 changed its subscription")

	// The push was diffed once for every stream that held all of G, and
	// the wildcard streams hold nothing but a pointer to G'.
	c.mu.Lock()
	defer c.mu.Unlock()
	if n := len(g2.types[resource.EndpointType].diffs); n != 1 {
		t.Errorf("G' was diffed from %d sources, want 1 (G, shared)", n)
	}
	var wildcardStates int
	for _, ds := range c.deltas {
		k := ds.known[resource.EndpointType]
		if k.at == g2.types[resource.EndpointType] && len(k.over) == 0 {
			wildcardStates++
		}
	}
	if wildcardStates < 2 {
		t.Errorf("%d streams hold a bare pointer to G', want at least the 2 wildcard ones", wildcardStates)
	}
}

// TestDeltaStateMatchesTheConfiguration: over random pushes and random
// subscription changes, what each delta client holds, applying every
// response as Envoy does, is exactly the node's configuration (a wildcard
// client) or its part the client names (a named one). Streams of several
// nodes share each configuration, so they share state and diffs.
func TestDeltaStateMatchesTheConfiguration(t *testing.T) {
	c := newCache(0, 0, nil)
	client := deltaServe(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	rng := rand.New(rand.NewPCG(7, 11))
	universe := []string{"a", "b", "c", "d", "e", "f", "g", "h"}
	randomPub := func() *published {
		res := map[string]string{}
		for _, name := range universe {
			if rng.IntN(3) > 0 {
				res[name] = strconv.Itoa(rng.IntN(3))
			}
		}
		return deltaPub(res)
	}
	type holder struct {
		s        *deltaTestStream
		node     string
		wildcard bool
		named    map[string]bool
		held     map[string]string
	}
	pub := randomPub()
	var hs []*holder
	for i := range 4 {
		h := &holder{node: fmt.Sprintf("n%d", i), wildcard: i%2 == 0, named: map[string]bool{}, held: map[string]string{}}
		if err := c.set(h.node, pub); err != nil {
			t.Fatal(err)
		}
		var sub []string
		if !h.wildcard {
			for _, name := range universe[:4] {
				h.named[name] = true
				sub = append(sub, name)
			}
		}
		h.s = openDelta(t, ctx, client, h.node, h.node, sub)
		hs = append(hs, h)
	}
	// apply takes every response until the stream is quiet.
	apply := func(h *holder) {
		for {
			select {
			case resp := <-h.s.got:
				if resp == nil {
					t.Fatalf("%s: the stream ended", h.node)
				}
				for _, r := range resp.GetResources() {
					h.held[r.GetName()] = r.GetVersion()
				}
				for _, name := range resp.GetRemovedResources() {
					delete(h.held, name)
				}
				h.s.send(&discoveryv3.DeltaDiscoveryRequest{ResponseNonce: resp.GetNonce()})
			case <-time.After(100 * time.Millisecond):
				return
			}
		}
	}
	check := func(step int) {
		ts := pub.types[resource.EndpointType]
		for _, h := range hs {
			apply(h)
			want := map[string]string{}
			for name, v := range ts.versions {
				if h.wildcard || h.named[name] {
					want[name] = v
				}
			}
			if !maps.Equal(h.held, want) {
				t.Fatalf("step %d: %s (wildcard %t, naming %v) holds %v, want %v", step, h.node, h.wildcard, h.named, h.held, want)
			}
		}
	}
	check(0)
	for step := 1; step <= 30; step++ {
		switch rng.IntN(3) {
		case 0, 1:
			pub = randomPub()
			for _, h := range hs {
				if err := c.set(h.node, pub); err != nil {
					t.Fatal(err)
				}
			}
		case 2:
			h := hs[rng.IntN(len(hs))]
			name := universe[rng.IntN(len(universe))]
			if h.wildcard {
				break
			}
			if h.named[name] {
				delete(h.named, name)
				// Envoy forgets what it no longer names.
				delete(h.held, name)
				h.s.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesUnsubscribe: []string{name}})
			} else {
				h.named[name] = true
				h.s.send(&discoveryv3.DeltaDiscoveryRequest{ResourceNamesSubscribe: []string{name}})
			}
		}
		check(step)
	}
}
