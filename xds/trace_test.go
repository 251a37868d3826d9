package xds_test

import (
	"context"
	"slices"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"

	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
)

// pushSpans returns the xds.push spans of node among spans, by attribute.
func pushSpans(spans []sdktrace.ReadOnlySpan, node string) []map[attribute.Key]attribute.Value {
	var out []map[attribute.Key]attribute.Value
	for _, s := range spans {
		if s.Name() != "xds.push" || s.InstrumentationScope().Name != "trustmesh/xds" {
			continue
		}
		a := map[attribute.Key]attribute.Value{}
		for _, kv := range s.Attributes() {
			a[kv.Key] = kv.Value
		}
		if a["xds.node_id"].AsString() == node {
			out = append(out, a)
		}
	}
	return out
}

// TestPushSpanPerNode: a node's first configuration and each later push
// to it are one xds.push span each, naming the node, the push's
// generation, the policy version and the types sent.
func TestPushSpanPerNode(t *testing.T) {
	m, _, b := twoPods()
	e := start(t, m, nil)
	node := meshtest.Node("sidecar", "10.0.0.2", b, false)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	s, err := e.dialADS(e.mint(b.ID)).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	first := pushSpans(e.spans.Ended(), node.GetId())
	if len(first) != 1 {
		t.Fatalf("%d xds.push spans for the node's first configuration, want 1", len(first))
	}
	if v := first[0]["xds.version"].AsInt64(); v != int64(e.srv.Pushes()) {
		t.Errorf("xds.version %d, want the push generation %d", v, e.srv.Pushes())
	}
	if types := first[0]["xds.types"].AsStringSlice(); !slices.Contains(types, resource.ClusterType) || !slices.IsSorted(types) {
		t.Errorf("xds.types %v, want the sorted types including clusters", types)
	}

	e.push(nil, parsePolicies(t, feedPolicy("/admin")))
	all := pushSpans(e.spans.Ended(), node.GetId())
	if len(all) != 2 {
		t.Fatalf("%d xds.push spans after one more push, want 2", len(all))
	}
	if all[1]["xds.version"].AsInt64() != all[0]["xds.version"].AsInt64()+1 || all[1]["xds.policy_version"].AsInt64() != 1 {
		t.Errorf("second push: version %d policy version %d, want %d and 1",
			all[1]["xds.version"].AsInt64(), all[1]["xds.policy_version"].AsInt64(), all[0]["xds.version"].AsInt64()+1)
	}
}
