package xds

import (
	"context"
	"fmt"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"runtime"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
)

// An authenticated client that unsubscribes names that do not exist must
// not grow its stream's delta overlay: nothing would ever be sent back to
// replace it, and every later request of the stream would walk all of it
// under the cache's global lock.
func TestDeltaUnsubscribingUnknownNamesKeepsNothing(t *testing.T) {
	c := newCache(0, 0, nil)
	client := deltaServe(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.set("n1", deltaPub(map[string]string{"a": "1", "b": "1"})); err != nil {
		t.Fatal(err)
	}
	s := openDelta(t, ctx, client, "wild", "n1", nil)
	s.expect("first answer", []string{"a@1", "b@1"}, nil)

	var before runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	const perReq, reqs = 15000, 40 // ~15k names of 12 bytes fit serve's 256 KiB MaxRecvMsgSize
	for r := range reqs {
		names := make([]string, perReq)
		for i := range names {
			names[i] = fmt.Sprintf("x%05d-%05d", r, i)
		}
		s.send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesUnsubscribe: names})
	}
	var over int
	deadline := time.Now().Add(5 * time.Second)
	for time.Now().Before(deadline) {
		// c.deltas is c.streamsMu's, what a stream holds c.mu's.
		c.mu.Lock()
		c.streamsMu.Lock()
		for _, ds := range c.deltas {
			if k := ds.known[resource.EndpointType]; k != nil {
				over = len(k.over)
			}
		}
		c.streamsMu.Unlock()
		c.mu.Unlock()
		if over >= perReq*reqs {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	var after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&after)
	t.Logf("overlay entries: %d, live heap grew %.1f MB", over, float64(after.HeapAlloc-before.HeapAlloc)/1e6)
	// Time one more request under the lock.
	start := time.Now()
	c.mu.Lock()
	c.streamsMu.Lock()
	var held []*deltaKnown
	for _, ds := range c.deltas {
		if k := ds.known[resource.EndpointType]; k != nil {
			held = append(held, k)
		}
	}
	c.streamsMu.Unlock()
	for _, k := range held {
		c.deltaSlow(k, c.nodes["n1"].pub.types[resource.EndpointType], true, nil)
	}
	c.mu.Unlock()
	t.Logf("one wildcard request's walk under c.mu: %s", time.Since(start))
	if over > 1000 {
		t.Errorf("the stream's overlay holds %d names the client made up (bound it by the names the typeSet has)", over)
	}
}

// A stream that subscribes to more than MaxSubscribedNames names of a type
// is ended with ResourceExhausted: go-control-plane keeps every subscribed
// name, and each request and push of the stream would walk them under the
// cache's lock.
func TestSubscribingTooManyNamesEndsTheStream(t *testing.T) {
	c := newCache(0, 0, nil)
	client := deltaServe(t, c)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := c.set("n1", deltaPub(map[string]string{"a": "1", "b": "1"})); err != nil {
		t.Fatal(err)
	}
	s, err := client.DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: "n1"}, TypeUrl: resource.EndpointType, ResourceNamesSubscribe: []string{"a"}}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	const perReq = 15000
	for r := range MaxSubscribedNames/perReq + 1 {
		names := make([]string, perReq)
		for i := range names {
			names[i] = fmt.Sprintf("y%05d-%05d", r, i)
		}
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResourceNamesSubscribe: names}); err != nil {
			break // the server has ended the stream
		}
	}
	for {
		_, err := s.Recv()
		if err == nil {
			continue
		}
		if status.Code(err) != codes.ResourceExhausted {
			t.Fatalf("a stream subscribing %d names ended with %v, want ResourceExhausted", (MaxSubscribedNames/perReq+1)*perReq, err)
		}
		return
	}
}
