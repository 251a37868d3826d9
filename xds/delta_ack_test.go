package xds

import (
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	streamv3 "github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
)

// A push sets every node's configuration in turn, each under the cache's
// lock, while the proxies it already reached acknowledge. An
// acknowledgement arrives as go-control-plane's request callback, then
// the cancel of the watch the push answered, then a new watch: only the
// new watch may need c.mu. So with c.mu held (a push setting another
// node), the callback and the cancel of an answered watch return; the
// cancel of a watch still waiting does take c.mu, and drops the watch.
func TestAcknowledgementTakesTheCacheLockOnce(t *testing.T) {
	c := newCache(0, 0, nil)
	node := &corev3.Node{Id: "n1"}
	sub := streamv3.NewDeltaSubscription(nil, nil, nil, true)
	out := make(chan cachev3.DeltaResponse, 2)
	request := func(nonce string) *discoveryv3.DeltaDiscoveryRequest {
		req := &discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.EndpointType, ResponseNonce: nonce}
		c.deltaRequest(1, req)
		return req
	}
	watch := func(req *discoveryv3.DeltaDiscoveryRequest) func() {
		t.Helper()
		cancel, err := c.CreateDeltaWatch(req, sub, out)
		if err != nil {
			t.Fatal(err)
		}
		return cancel
	}
	receive := func(what string) {
		t.Helper()
		select {
		case resp := <-out:
			sub.SetReturnedResources(resp.GetNextVersionMap())
		case <-time.After(5 * time.Second):
			t.Fatalf("%s: no answer", what)
		}
	}
	if err := c.set("n1", deltaPub(map[string]string{"a": "1"})); err != nil {
		t.Fatal(err)
	}
	watch(request(""))
	receive("the first request")
	answered := watch(request("1")) // the acknowledgement: nothing new, it waits
	if err := c.set("n1", deltaPub(map[string]string{"a": "2"})); err != nil {
		t.Fatal(err)
	}
	receive("the push")

	c.mu.Lock()
	done := make(chan struct{})
	go func() {
		defer close(done)
		answered()
		request("2")
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		c.mu.Unlock()
		<-done
		t.Fatal("an acknowledgement's callback and its answered watch's cancel waited for c.mu, which a push holds for every node it sets")
	}
	c.mu.Unlock()

	// A watch that was not answered is still dropped by its cancel.
	waiting := watch(request("2"))
	c.mu.Lock()
	held := len(c.nodes["n1"].dwatches)
	c.mu.Unlock()
	if held != 1 {
		t.Fatalf("the node holds %d delta watches after an acknowledgement with nothing new, want 1", held)
	}
	waiting()
	c.mu.Lock()
	held = len(c.nodes["n1"].dwatches)
	c.mu.Unlock()
	if held != 0 {
		t.Fatalf("the node holds %d delta watches after its waiting watch was cancelled, want 0", held)
	}
}
