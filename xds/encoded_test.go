package xds

import (
	"fmt"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	streamv3 "github.com/envoyproxy/go-control-plane/pkg/server/stream/v3"
	"google.golang.org/protobuf/proto"
)

// TestStreamsShareOneEncoding: the first answers of streams that share a
// generation carry one encoding of its resources, made once, not one per
// stream (state of the world and delta); the first stream a generation is
// sent to is answered with the resources themselves, so that a pod with a
// configuration of its own keeps no encoding besides them. Each answer
// parses, off the wire, to exactly the resources, in order, that the
// response would otherwise hold.
func TestStreamsShareOneEncoding(t *testing.T) {
	names := make([]string, 200)
	for i := range names {
		names[i] = fmt.Sprintf("r%03d", i)
	}
	pub := pubOf("v1", names...)
	ts := pub.types[resource.EndpointType]
	ts.versions = map[string]string{}
	for _, n := range names {
		ts.versions[n] = "v1"
	}
	c := newCache(0, 0, nil)

	// State of the world: two nodes, one generation.
	var sotw [][]byte
	for i, id := range []string{"a", "b", "c"} {
		if err := c.set(id, pub); err != nil {
			t.Fatal(err)
		}
		ch := make(chan cachev3.Response, 1)
		if _, err := c.CreateWatch(&cachev3.Request{Node: &corev3.Node{Id: id}, TypeUrl: resource.EndpointType},
			streamv3.NewSotwSubscription(nil, true), ch); err != nil {
			t.Fatal(err)
		}
		r := (<-ch).(*cachev3.PassthroughResponse).DiscoveryResponse
		switch {
		case i == 0 && (len(r.GetResources()) != len(names) || len(r.ProtoReflect().GetUnknown()) != 0 || ts.allEncoded != nil):
			t.Fatalf("the first stream's response holds %d resources, the type an encoding of %d bytes, want the resources alone",
				len(r.GetResources()), len(ts.allEncoded))
		case i > 0 && len(r.GetResources()) != 0:
			t.Fatalf("node %s: the response holds %d resources of its own, want them encoded once for all", id, len(r.GetResources()))
		case i > 0:
			sotw = append(sotw, r.ProtoReflect().GetUnknown())
		}
		got := wire(t, r, &discoveryv3.DiscoveryResponse{})
		want := &discoveryv3.DiscoveryResponse{VersionInfo: "v1", TypeUrl: resource.EndpointType, Resources: ts.allAnys()}
		if !proto.Equal(got, want) {
			t.Fatalf("node %s: the client parses %d resources at %q, want %d at v1", id, len(got.GetResources()), got.GetVersionInfo(), len(names))
		}
	}
	if !sameBytes(sotw[0], sotw[1]) {
		t.Fatal("state of the world: each stream has an encoding of its own, want one shared")
	}

	// Delta: three wildcard streams holding nothing, then a named stream
	// that names all of them, get the one diff from nothing.
	var delta [][]byte
	for i, named := range []bool{false, false, false, true} {
		var sub streamv3.Subscription
		if named {
			sub = streamv3.NewDeltaSubscription(names, nil, nil, false)
		} else {
			sub = streamv3.NewDeltaSubscription(nil, nil, nil, true)
		}
		req := &cachev3.DeltaRequest{Node: &corev3.Node{Id: "d"}, TypeUrl: resource.EndpointType}
		c.mu.Lock()
		resp, next := c.deltaAnswer(&deltaKnown{}, req, sub, true, pub)
		c.mu.Unlock()
		if resp == nil || next.at != ts {
			t.Fatalf("named %t: answer %v, holding %v, want all of the generation", named, resp, next)
		}
		r := resp.DeltaDiscoveryResponse
		switch {
		case i == 0 && (len(r.GetResources()) != len(names) || len(r.ProtoReflect().GetUnknown()) != 0):
			t.Fatalf("the first stream's response holds %d resources and %d encoded bytes, want the resources alone",
				len(r.GetResources()), len(r.ProtoReflect().GetUnknown()))
		case i > 0 && len(r.GetResources()) != 0:
			t.Fatalf("named %t: the response holds %d resources of its own, want them encoded once for all", named, len(r.GetResources()))
		case i > 0:
			delta = append(delta, r.ProtoReflect().GetUnknown())
		}
		got := wire(t, r, &discoveryv3.DeltaDiscoveryResponse{})
		if len(got.GetResources()) != len(names) || got.GetSystemVersionInfo() != "v1" {
			t.Fatalf("named %t: the client parses %d resources at %q, want %d at v1", named, len(got.GetResources()), got.GetSystemVersionInfo(), len(names))
		}
		for i, res := range got.GetResources() {
			if want := ts.deltaResource(names[i]); !proto.Equal(res, want) {
				t.Fatalf("named %t: resource %d is %v, want %v", named, i, res, want)
			}
		}
	}
	if !sameBytes(delta[0], delta[1]) || !sameBytes(delta[0], delta[2]) {
		t.Fatal("delta: each stream has an encoding of its own, want one shared")
	}

	// A named stream that names only some is sent just those, its own.
	sub := streamv3.NewDeltaSubscription(names[:3], nil, nil, false)
	c.mu.Lock()
	resp, _ := c.deltaAnswer(&deltaKnown{}, &cachev3.DeltaRequest{Node: &corev3.Node{Id: "d"}, TypeUrl: resource.EndpointType}, sub, true, pub)
	c.mu.Unlock()
	if got := wire(t, resp.DeltaDiscoveryResponse, &discoveryv3.DeltaDiscoveryResponse{}); len(got.GetResources()) != 3 {
		t.Fatalf("a stream naming 3 resources parses %d", len(got.GetResources()))
	}
}

// wire is m as a client parses it.
func wire[M proto.Message](t *testing.T, m proto.Message, into M) M {
	t.Helper()
	b, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if err := proto.Unmarshal(b, into); err != nil {
		t.Fatal(err)
	}
	return into
}

func sameBytes(a, b []byte) bool {
	return len(a) > 0 && len(a) == len(b) && &a[0] == &b[0]
}
