package xds_test

import (
	"context"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"

	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
)

// TestClientsReportsConnectedNodes: a node that was sent a version and has
// not acknowledged it is connected, not synced, and pending since the
// send; once it acknowledges, it is synced and nothing is pending. The
// debug endpoint serves the same list as JSON.
func TestClientsReportsConnectedNodes(t *testing.T) {
	m, a, _ := twoPods()
	e := start(t, m, nil)
	connected := e.xclock.Now()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := e.dialADS(e.mint(a.ID)).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := meshtest.Node("sidecar", "10.0.0.1", a, false)
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	resp, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	sent := e.xclock.Now()
	e.xclock.Step(time.Minute)

	c := onlyClient(t, e.srv.Clients())
	if c.NodeID != node.GetId() || c.SPIFFEID != a.ID.String() || c.Streams != 1 || c.Delta {
		t.Errorf("client = %+v, want node %s of %s on one state-of-the-world stream", c, node.GetId(), a.ID)
	}
	if !c.ConnectedSince.Equal(connected) || !c.PendingSince.Equal(sent) {
		t.Errorf("connected since %v, pending since %v; want %v and %v", c.ConnectedSince, c.PendingSince, connected, sent)
	}
	if c.Synced || e.srv.Synced(node.GetId()) {
		t.Error("a node that has not acknowledged its configuration is synced")
	}
	if len(c.Types) != 1 || c.Types[0].TypeURL != resource.ClusterType || c.Types[0].Sent != resp.GetVersionInfo() ||
		c.Types[0].Acked != "" || c.Types[0].Current != resp.GetVersionInfo() {
		t.Errorf("types = %+v, want clusters sent and current at %s, not acked", c.Types, resp.GetVersionInfo())
	}

	// The acknowledgement.
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType,
		VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(10 * time.Second); !e.srv.Synced(node.GetId()); time.Sleep(5 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("the node never became synced after acknowledging")
		}
	}

	rec := httptest.NewRecorder()
	e.srv.ClientsHandler().ServeHTTP(rec, httptest.NewRequest(http.MethodGet, xds.ClientsPath, nil))
	var got xds.Clients
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil {
		t.Fatalf("%s: %v\n%s", xds.ClientsPath, err, rec.Body)
	}
	c = onlyClient(t, got)
	if !c.Synced || !c.PendingSince.IsZero() || c.Types[0].Acked != resp.GetVersionInfo() {
		t.Errorf("after the acknowledgement: %+v, want synced with nothing pending", c)
	}
	if !got.Time.Equal(e.xclock.Now()) {
		t.Errorf("report time %v, want the server's clock %v", got.Time, e.xclock.Now())
	}
}

// TestClientsDeltaNodeIsNotSynced: a delta stream's versions are not
// tracked, so its node is connected but never reported synced.
func TestClientsDeltaNodeIsNotSynced(t *testing.T) {
	m, a, _ := twoPods()
	e := start(t, m, nil)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	s, err := e.dialADS(e.mint(a.ID)).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	node := meshtest.Node("sidecar", "10.0.0.1", a, false)
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	c := onlyClient(t, e.srv.Clients())
	if !c.Delta || c.Synced || len(c.Types) != 0 {
		t.Errorf("delta client = %+v, want delta, not synced, no tracked types", c)
	}
}

func onlyClient(t *testing.T, cs xds.Clients) xds.ClientStatus {
	t.Helper()
	if len(cs.Clients) != 1 {
		t.Fatalf("%d clients, want 1: %+v", len(cs.Clients), cs.Clients)
	}
	return cs.Clients[0]
}
