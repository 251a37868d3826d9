package xds

import (
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	streamv3 "github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	clocktesting "k8s.io/utils/clock/testing"
)

func pubOf(version string, names ...string) *published {
	ts := &typeSet{version: version, anys: map[string]*anypb.Any{}}
	for _, n := range names {
		ts.names = append(ts.names, n)
		ts.anys[n] = &anypb.Any{TypeUrl: resource.EndpointType, Value: []byte(n)}
	}
	return &published{snap: &cachev3.Snapshot{}, types: map[string]*typeSet{resource.EndpointType: ts}}
}

// receive returns the response a watch was sent, its DiscoveryResponse as
// the client parses it off the wire (a wildcard one carries its resources
// encoded, encoded.go).
func receive(t *testing.T, ch chan cachev3.Response) *cachev3.PassthroughResponse {
	t.Helper()
	select {
	case r := <-ch:
		p := r.(*cachev3.PassthroughResponse)
		b, err := proto.Marshal(p.DiscoveryResponse)
		if err != nil {
			t.Fatal(err)
		}
		got := &discoveryv3.DiscoveryResponse{}
		if err := proto.Unmarshal(b, got); err != nil {
			t.Fatal(err)
		}
		p.DiscoveryResponse = got
		return p
	default:
		return nil
	}
}

// TestSotwCache: a watch is answered at once only when the client lacks
// the current version or a subscribed resource; otherwise it waits for a
// newer version; answers carry only the subscribed resources.
func TestSotwCache(t *testing.T) {
	c := newCache(0, 0, nil)
	node := &corev3.Node{Id: "n"}
	if err := c.set("n", pubOf("v1", "a", "b")); err != nil {
		t.Fatal(err)
	}
	sub := streamv3.NewSotwSubscription([]string{"a"}, true)
	ch := make(chan cachev3.Response, 1)
	if _, err := c.CreateWatch(&cachev3.Request{Node: node, TypeUrl: resource.EndpointType}, sub, ch); err != nil {
		t.Fatal(err)
	}
	r := receive(t, ch)
	if r == nil || r.DiscoveryResponse.GetVersionInfo() != "v1" || len(r.DiscoveryResponse.GetResources()) != 1 {
		t.Fatalf("first answer = %v, want v1 with resource a only", r)
	}
	sub.SetReturnedResources(r.GetReturnedResources())

	// The acknowledgement waits.
	cancel, err := c.CreateWatch(&cachev3.Request{Node: node, TypeUrl: resource.EndpointType, VersionInfo: "v1", ResourceNames: []string{"a"}}, sub, ch)
	if err != nil {
		t.Fatal(err)
	}
	if r := receive(t, ch); r != nil {
		t.Fatalf("acknowledgement answered with %v", r.DiscoveryResponse)
	}
	// A new version is pushed to it.
	if err := c.set("n", pubOf("v2", "a", "b")); err != nil {
		t.Fatal(err)
	}
	if r := receive(t, ch); r == nil || r.DiscoveryResponse.GetVersionInfo() != "v2" {
		t.Fatalf("push = %v, want v2", r)
	}
	cancel()

	// Subscribing to a resource not yet sent is answered at the same
	// version.
	sub.SetReturnedResources(map[string]string{"a": "v2"})
	sub.SetResourceSubscription([]string{"a", "b"})
	if _, err := c.CreateWatch(&cachev3.Request{Node: node, TypeUrl: resource.EndpointType, VersionInfo: "v2", ResourceNames: []string{"a", "b"}}, sub, ch); err != nil {
		t.Fatal(err)
	}
	if r := receive(t, ch); r == nil || len(r.DiscoveryResponse.GetResources()) != 2 {
		t.Fatalf("answer to the wider subscription = %v, want a and b", r)
	}

	// A cancelled watch is never answered, and a cleared node forgets.
	sub2 := streamv3.NewSotwSubscription([]string{"a", "b"}, true)
	sub2.SetReturnedResources(map[string]string{"a": "v2", "b": "v2"})
	cancel, _ = c.CreateWatch(&cachev3.Request{Node: node, TypeUrl: resource.EndpointType, VersionInfo: "v2", ResourceNames: []string{"a", "b"}}, sub2, ch)
	if r := receive(t, ch); r != nil {
		t.Fatalf("an up-to-date watch was answered: %v", r.DiscoveryResponse)
	}
	cancel()
	c.clear("n")
	if err := c.set("n", pubOf("v3", "a")); err != nil {
		t.Fatal(err)
	}
	if r := receive(t, ch); r != nil {
		t.Fatalf("a cancelled watch was answered: %v", r.DiscoveryResponse)
	}
}

// TestSotwCacheThrottlesFirstAnswers: with one token, a second node's
// first answer waits until the first node acknowledges its own. The hold
// time is a minute, longer than the test waits, so that a token given
// back only when its hold expires fails it.
func TestSotwCacheThrottlesFirstAnswers(t *testing.T) {
	c := newCache(1, time.Minute, nil)
	defer c.stop()
	for _, id := range []string{"a", "b"} {
		if err := c.set(id, pubOf("v1", "x")); err != nil {
			t.Fatal(err)
		}
	}
	chA := make(chan cachev3.Response, 1)
	subA := streamv3.NewSotwSubscription(nil, true)
	if _, err := c.CreateWatch(&cachev3.Request{Node: &corev3.Node{Id: "a"}, TypeUrl: resource.EndpointType}, subA, chA); err != nil {
		t.Fatal(err)
	}
	r := receive(t, chA)
	if r == nil {
		t.Fatal("the first node got no answer")
	}
	chB := make(chan cachev3.Response, 1)
	go func() {
		_, _ = c.CreateWatch(&cachev3.Request{Node: &corev3.Node{Id: "b"}, TypeUrl: resource.EndpointType}, streamv3.NewSotwSubscription(nil, true), chB)
	}()
	select {
	case <-chB:
		t.Fatal("the second node was answered while the first held the only token")
	case <-time.After(50 * time.Millisecond):
	}
	// A's acknowledgement frees the token.
	subA.SetReturnedResources(r.GetReturnedResources())
	if _, err := c.CreateWatch(&cachev3.Request{Node: &corev3.Node{Id: "a"}, TypeUrl: resource.EndpointType, VersionInfo: "v1", ResponseNonce: "1"}, subA, chA); err != nil {
		t.Fatal(err)
	}
	select {
	case <-chB:
	case <-time.After(10 * time.Second):
		t.Fatal("the second node was never answered")
	}
}

// TestSotwCacheTokenExpires: a node that never acknowledges its first
// answer holds its token for the hold time only; then a waiting node is
// answered. The hold time is measured on the cache's clock.
func TestSotwCacheTokenExpires(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Unix(1_700_000_000, 0))
	c := newCache(1, 10*time.Second, clk)
	defer c.stop()
	for _, id := range []string{"silent", "new"} {
		if err := c.set(id, pubOf("v1", "x")); err != nil {
			t.Fatal(err)
		}
	}
	chA := make(chan cachev3.Response, 1)
	if _, err := c.CreateWatch(&cachev3.Request{Node: &corev3.Node{Id: "silent"}, TypeUrl: resource.EndpointType}, streamv3.NewSotwSubscription(nil, true), chA); err != nil {
		t.Fatal(err)
	}
	if receive(t, chA) == nil {
		t.Fatal("the first node got no answer")
	}
	chB := make(chan cachev3.Response, 1)
	go func() {
		_, _ = c.CreateWatch(&cachev3.Request{Node: &corev3.Node{Id: "new"}, TypeUrl: resource.EndpointType}, streamv3.NewSotwSubscription(nil, true), chB)
	}()
	// The waiter sets a timer for the silent node's expiry.
	deadline := time.Now().Add(10 * time.Second)
	for !clk.HasWaiters() {
		if time.Now().After(deadline) {
			t.Fatal("the second node does not wait for the token's expiry")
		}
		time.Sleep(time.Millisecond)
	}
	clk.Step(9 * time.Second)
	select {
	case <-chB:
		t.Fatal("the second node was answered before the token expired")
	case <-time.After(50 * time.Millisecond):
	}
	clk.Step(time.Second)
	select {
	case <-chB:
	case <-time.After(10 * time.Second):
		t.Fatal("the token of a node that never acknowledged did not expire")
	}
}

// TestSotwWildcardReturnsOneEntry: what a wildcard watch was returned is
// one entry whatever the number of resources (each stream keeps it), an
// acknowledgement of it waits, and a client that then names resources at
// the same version is answered, as a new subscription must be.
func TestSotwWildcardReturnsOneEntry(t *testing.T) {
	c := newCache(0, 0, nil)
	node := &corev3.Node{Id: "n"}
	names := make([]string, 500)
	for i := range names {
		names[i] = string(rune('a'+i%26)) + time.Duration(i).String()
	}
	if err := c.set("n", pubOf("v1", names...)); err != nil {
		t.Fatal(err)
	}
	sub := streamv3.NewSotwSubscription(nil, true)
	ch := make(chan cachev3.Response, 1)
	if _, err := c.CreateWatch(&cachev3.Request{Node: node, TypeUrl: resource.EndpointType}, sub, ch); err != nil {
		t.Fatal(err)
	}
	r := receive(t, ch)
	if r == nil || len(r.DiscoveryResponse.GetResources()) != len(names) {
		t.Fatalf("first answer = %v, want all %d resources", r, len(names))
	}
	if got := len(r.GetReturnedResources()); got != 1 {
		t.Fatalf("a wildcard answer returned %d entries, want 1", got)
	}
	sub.SetReturnedResources(r.GetReturnedResources())

	// The acknowledgement waits (and keeps waiting: no answer loop).
	cancel, err := c.CreateWatch(&cachev3.Request{Node: node, TypeUrl: resource.EndpointType, VersionInfo: "v1", ResponseNonce: "1"}, sub, ch)
	if err != nil {
		t.Fatal(err)
	}
	if r := receive(t, ch); r != nil {
		t.Fatalf("acknowledgement answered with %v", r.DiscoveryResponse)
	}
	cancel()

	// Naming resources ends the wildcard: answered at the same version,
	// with just those.
	sub.SetResourceSubscription([]string{names[3]})
	if _, err := c.CreateWatch(&cachev3.Request{Node: node, TypeUrl: resource.EndpointType, VersionInfo: "v1", ResourceNames: []string{names[3]}}, sub, ch); err != nil {
		t.Fatal(err)
	}
	if r := receive(t, ch); r == nil || len(r.DiscoveryResponse.GetResources()) != 1 {
		t.Fatalf("answer to the named subscription = %v, want %s alone", r, names[3])
	}
}

// TestSotwCacheThrottlesPushes: a push reaches at most as many nodes at
// once as there are tokens; the rest wait in order and are sent the
// version current when their turn comes, as earlier nodes acknowledge or
// their hold expires on the cache's clock.
func TestSotwCacheThrottlesPushes(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Unix(1_700_000_000, 0))
	const tokens, nodes = 2, 5
	c := newCache(tokens, 10*time.Second, clk)
	defer c.stop()
	ids := []string{"n0", "n1", "n2", "n3", "n4"}
	chs := map[string]chan cachev3.Response{}
	subs := map[string]*streamv3.Subscription{}
	for _, id := range ids {
		if err := c.set(id, pubOf("v1", "x")); err != nil {
			t.Fatal(err)
		}
		sub := streamv3.NewSotwSubscription(nil, true)
		chs[id], subs[id] = make(chan cachev3.Response, 1), &sub
	}
	// watch sends a request for id at version v (an acknowledgement when
	// nonce is set) and returns the answer given at once, if any.
	watch := func(id, v, nonce string) *cachev3.PassthroughResponse {
		t.Helper()
		if _, err := c.CreateWatch(&cachev3.Request{Node: &corev3.Node{Id: id}, TypeUrl: resource.EndpointType, VersionInfo: v, ResponseNonce: nonce}, subs[id], chs[id]); err != nil {
			t.Fatal(err)
		}
		r := receive(t, chs[id])
		if r != nil {
			subs[id].SetReturnedResources(r.GetReturnedResources())
		}
		return r
	}
	// Every node gets v1 (one at a time: each acknowledges before the
	// next asks) and waits with an acknowledgement.
	for _, id := range ids {
		if r := watch(id, "", ""); r == nil || r.DiscoveryResponse.GetVersionInfo() != "v1" {
			t.Fatalf("%s: first answer %v", id, r)
		}
		if r := watch(id, "v1", "1"); r != nil {
			t.Fatalf("%s: acknowledgement answered with %v", id, r.DiscoveryResponse)
		}
	}
	// answered collects the nodes answered since the last call, with the
	// version each was sent.
	answered := func() map[string]string {
		got := map[string]string{}
		for _, id := range ids {
			if r := receive(t, chs[id]); r != nil {
				subs[id].SetReturnedResources(r.GetReturnedResources())
				got[id] = r.DiscoveryResponse.GetVersionInfo()
			}
		}
		return got
	}
	for _, id := range ids {
		if err := c.set(id, pubOf("v2", "x")); err != nil {
			t.Fatal(err)
		}
	}
	got := answered()
	if len(got) != tokens || got["n0"] != "v2" || got["n1"] != "v2" {
		t.Fatalf("a push to %d nodes with %d tokens answered %v, want n0 and n1 at v2", nodes, tokens, got)
	}
	// n2 is sent a newer version while it waits: its turn brings that one.
	if err := c.set("n2", pubOf("v3", "x")); err != nil {
		t.Fatal(err)
	}
	if got := answered(); len(got) != 0 {
		t.Fatalf("answered %v while every token was held", got)
	}
	// n0 acknowledges: the first waiting node is answered, with v3.
	if r := watch("n0", "v2", "2"); r != nil {
		t.Fatalf("n0's acknowledgement answered with %v", r.DiscoveryResponse)
	}
	if got := answered(); len(got) != 1 || got["n2"] != "v3" {
		t.Fatalf("after one acknowledgement answered %v, want n2 at v3", got)
	}
	// n1 and n2 never acknowledge: their holds expire and n3 and n4 are
	// answered then, not before. The clock moves only once the drain
	// waits on it: a step between its reading the time and setting its
	// timer would set the timer a step late.
	for deadline := time.Now().Add(10 * time.Second); !clk.HasWaiters(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the drain does not wait for the next hold's expiry")
		}
	}
	clk.Step(9 * time.Second)
	time.Sleep(50 * time.Millisecond)
	if got := answered(); len(got) != 0 {
		t.Fatalf("answered %v before any hold expired", got)
	}
	clk.Step(time.Second) // the timer the drain set is still there
	deadline := time.Now().Add(10 * time.Second)
	got = map[string]string{}
	for len(got) < 1 && time.Now().Before(deadline) {
		for id, v := range answered() {
			got[id] = v
		}
		time.Sleep(time.Millisecond)
	}
	if got["n3"] != "v2" {
		t.Fatalf("after n1's hold expired answered %v, want n3 at v2", got)
	}
	clk.Step(10 * time.Second)
	for len(got) < 2 && time.Now().Before(deadline) {
		for id, v := range answered() {
			got[id] = v
		}
		time.Sleep(time.Millisecond)
	}
	if got["n4"] != "v2" {
		t.Fatalf("after the holds expired answered %v, want n3 and n4 at v2", got)
	}
}

// TestDeltaCacheThrottlesFirstAnswers: delta first answers take the same
// tokens as state-of-the-world ones. With one token, a second node's first
// delta answer waits until the first node acknowledges its own (the hold
// time is a minute, as in TestSotwCacheThrottlesFirstAnswers).
func TestDeltaCacheThrottlesFirstAnswers(t *testing.T) {
	c := newCache(1, time.Minute, nil)
	defer c.stop()
	for _, id := range []string{"a", "b"} {
		if err := c.set(id, deltaPub(map[string]string{"x": "1"})); err != nil {
			t.Fatal(err)
		}
	}
	request := func(stream int64, id, nonce string) *discoveryv3.DeltaDiscoveryRequest {
		req := &discoveryv3.DeltaDiscoveryRequest{Node: &corev3.Node{Id: id}, TypeUrl: resource.EndpointType, ResponseNonce: nonce}
		c.deltaRequest(stream, req)
		return req
	}
	subA := streamv3.NewDeltaSubscription(nil, nil, nil, true)
	chA := make(chan cachev3.DeltaResponse, 2)
	if _, err := c.CreateDeltaWatch(request(1, "a", ""), subA, chA); err != nil {
		t.Fatal(err)
	}
	var r cachev3.DeltaResponse
	select {
	case r = <-chA:
	case <-time.After(10 * time.Second):
		t.Fatal("the first node got no answer")
	}
	chB := make(chan cachev3.DeltaResponse, 2)
	reqB := request(2, "b", "")
	go func() {
		_, _ = c.CreateDeltaWatch(reqB, streamv3.NewDeltaSubscription(nil, nil, nil, true), chB)
	}()
	select {
	case <-chB:
		t.Fatal("the second node was answered while the first held the only token")
	case <-time.After(50 * time.Millisecond):
	}
	// A's acknowledgement frees the token.
	subA.SetReturnedResources(r.GetNextVersionMap())
	if _, err := c.CreateDeltaWatch(request(1, "a", "1"), subA, chA); err != nil {
		t.Fatal(err)
	}
	select {
	case <-chB:
	case <-time.After(10 * time.Second):
		t.Fatal("the second node was never answered")
	}
}
