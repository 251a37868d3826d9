package xds_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
)

// TestNeverAckingStreamsDoNotStarveTheMesh is the attack of issue 10 §7:
// one workload certificate opens 256 streams, each naming its own node id
// for its pod (the IP in the id varies), takes its first configuration
// and never acknowledges it. A new node of another identity must still get
// its configuration within seconds. The identity's streams and node ids
// are capped; what it is refused is ResourceExhausted.
func TestNeverAckingStreamsDoNotStarveTheMesh(t *testing.T) {
	m, a, b := twoPods()
	e := start(t, m, nil)
	attacker := e.dialADS(e.mint(a.ID))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	const streams = 256
	codesSeen := map[codes.Code]int{}
	var mu sync.Mutex
	var wg sync.WaitGroup
	for i := range streams {
		wg.Add(1)
		go func() {
			defer wg.Done()
			code := func() codes.Code {
				s, err := attacker.StreamAggregatedResources(ctx)
				if err != nil {
					return status.Code(err)
				}
				node := meshtest.Node("sidecar", fmt.Sprintf("10.7.%d.%d", i/250, i%250+1), a, false)
				_ = s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType})
				// Take the first answer and never acknowledge it.
				_, err = s.Recv()
				return status.Code(err)
			}()
			mu.Lock()
			codesSeen[code]++
			mu.Unlock()
		}()
	}
	wg.Wait()
	t.Logf("the attacker's %d streams: %v", streams, codesSeen)

	start := time.Now()
	victim := meshtest.Node("sidecar", "10.0.0.2", b, false)
	vctx, vcancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer vcancel()
	s, err := e.dialADS(e.mint(b.ID)).StreamAggregatedResources(vctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: victim, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	resp, err := s.Recv()
	if err != nil {
		t.Fatalf("a new node got no configuration while the attacker's streams held their slots: %v", err)
	}
	if len(resp.GetResources()) == 0 {
		t.Fatal("the new node's first answer is empty")
	}
	t.Logf("the new node's first configuration took %v", time.Since(start))
	if codesSeen[codes.OK] > 4 || codesSeen[codes.ResourceExhausted] == 0 {
		t.Fatalf("the attacker's streams: %v, want at most 4 served and the rest ResourceExhausted", codesSeen)
	}
}

// TestIdentityCapsScaleWithPods: the caps are per pod the mesh lists under
// a SPIFFE ID, so that the replicas of a Deployment, which share a service
// account, are each served; a fifth node id for a one-pod identity is
// refused.
func TestIdentityCapsScaleWithPods(t *testing.T) {
	m, a, _ := twoPods()
	// Five more replicas of a, under its service account.
	for i := range 5 {
		r := &mesh.Workload{Namespace: a.Namespace, Name: fmt.Sprintf("pod-a-%d", i), ServiceAccount: a.ServiceAccount, ID: a.ID, Labels: a.Labels}
		m.Services[0].Endpoints = append(m.Services[0].Endpoints, mesh.Endpoint{Address: fmt.Sprintf("10.0.1.%d", i+1), Workload: r})
	}
	e := start(t, m, nil)
	c := e.dialADS(e.mint(a.ID))
	var replicas []*mesh.Workload
	for _, ep := range m.Services[0].Endpoints {
		replicas = append(replicas, ep.Workload)
	}
	// Each of the six replicas connects once: all served.
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	for i, w := range replicas {
		s, err := c.StreamAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_ = s.Send(&discoveryv3.DiscoveryRequest{Node: meshtest.Node("sidecar", fmt.Sprintf("10.0.2.%d", i+1), w, false), TypeUrl: resource.ClusterType})
		if _, err := s.Recv(); err != nil {
			t.Fatalf("replica %s refused: %v", w.Name, err)
		}
	}
}

// TestDeltaStreamsDoNotFreeStateOfTheWorldCaps: go-control-plane numbers
// state of the world and delta streams with two counters, so a delta
// stream and a state of the world stream share a number. An identity that
// holds its caps with state of the world streams, then opens delta streams
// that are refused, must not get its caps back: it is still refused a new
// node id while its first streams stay open.
func TestDeltaStreamsDoNotFreeStateOfTheWorldCaps(t *testing.T) {
	m, a, _ := twoPods()
	e := start(t, m, nil)
	c := e.dialADS(e.mint(a.ID))
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	serve := func(i int) error {
		s, err := c.StreamAggregatedResources(ctx)
		if err != nil {
			return err
		}
		_ = s.Send(&discoveryv3.DiscoveryRequest{Node: meshtest.Node("sidecar", fmt.Sprintf("10.8.0.%d", i+1), a, false), TypeUrl: resource.ClusterType})
		_, err = s.Recv()
		return err
	}
	// Four node ids (the cap), on streams 1 to 4.
	for i := range 4 {
		if err := serve(i); err != nil {
			t.Fatalf("node %d of the cap refused: %v", i, err)
		}
	}
	// Four more streams, 5 to 8, that name no node yet: the identity
	// holds its 8 streams.
	for range 4 {
		if _, err := c.StreamAggregatedResources(ctx); err != nil {
			t.Fatal(err)
		}
	}
	deadline := time.Now().Add(5 * time.Second)
	for e.gauge("trustmesh_xds_connected_proxies") != 8 {
		if time.Now().After(deadline) {
			t.Fatalf("the server has %v streams open, want 8", e.gauge("trustmesh_xds_connected_proxies"))
		}
		time.Sleep(10 * time.Millisecond)
	}
	// Delta streams 1 to 8: each refused at the stream cap.
	for i := range 8 {
		d, err := c.DeltaAggregatedResources(ctx)
		if err != nil {
			t.Fatal(err)
		}
		_ = d.Send(&discoveryv3.DeltaDiscoveryRequest{Node: meshtest.Node("sidecar", fmt.Sprintf("10.8.1.%d", i+1), a, false), TypeUrl: resource.ClusterType})
		if _, err := d.Recv(); status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("delta stream %d over the cap: %v, want ResourceExhausted", i, err)
		}
	}
	// The first four streams are still open, so a fifth node id is
	// refused.
	for i := 4; i < 8; i++ {
		if err := serve(i); status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("node %d over the cap: %v, want ResourceExhausted", i, err)
		}
	}
}
