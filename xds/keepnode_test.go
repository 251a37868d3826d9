package xds_test

import (
	"sync"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
)

// nodeRequests records the requests a stream's handler received: the very
// messages go-control-plane keeps a stream's node from.
type nodeRequests struct {
	grpc.ServerStream
	mu   *sync.Mutex
	reqs *[]interface{ GetNode() *corev3.Node }
}

func (c nodeRequests) RecvMsg(m any) error {
	err := c.ServerStream.RecvMsg(m)
	if r, ok := m.(interface{ GetNode() *corev3.Node }); ok && err == nil {
		c.mu.Lock()
		*c.reqs = append(*c.reqs, r)
		c.mu.Unlock()
	}
	return err
}

// TestServerKeepsOnlyTheNodeID: go-control-plane keeps the first request's
// node for the stream's life (state of the world: that very message;
// delta: its node pointer). Once the server checked it, that node holds
// its id and nothing more, on both kinds of stream. It sees the message
// the server received, so it fails if a stream's callback stops calling
// keepNodeID, and if go-control-plane starts keeping a copy of the node
// (then keepNodeID would save nothing and must be rethought).
func TestServerKeepsOnlyTheNodeID(t *testing.T) {
	for _, delta := range []bool{false, true} {
		var mu sync.Mutex
		var reqs []interface{ GetNode() *corev3.Node }
		streamInterceptor = func(srv any, ss grpc.ServerStream, _ *grpc.StreamServerInfo, h grpc.StreamHandler) error {
			return h(srv, nodeRequests{ServerStream: ss, mu: &mu, reqs: &reqs})
		}
		m, a, _ := twoPods()
		e := start(t, m, nil)
		streamInterceptor = nil
		node := meshtest.Node("sidecar", "10.0.0.1", a, false)
		if len(node.GetMetadata().GetFields()) == 0 {
			t.Fatal("the test node has no metadata to drop")
		}
		if _, err := firstResponse(t, e.dialADS(e.mint(a.ID)), delta, node); err != nil {
			t.Fatalf("delta %v: %v", delta, err)
		}
		mu.Lock()
		if len(reqs) != 1 {
			t.Fatalf("delta %v: captured %d requests, want 1", delta, len(reqs))
		}
		if got := reqs[0].GetNode(); !proto.Equal(got, &corev3.Node{Id: node.GetId()}) {
			t.Errorf("delta %v: the stream's kept node after the first answer = %v, want only its id %q", delta, got, node.GetId())
		}
		mu.Unlock()
	}
}
