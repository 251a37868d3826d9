package xds_test

import (
	"context"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
)

func twoPods() (*mesh.Mesh, *mesh.Workload, *mesh.Workload) {
	a := &mesh.Workload{Namespace: "ns-a", Name: "pod-a", ServiceAccount: "sa-a", ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns-a/sa/sa-a"), Labels: map[string]string{"app": "a"}}
	b := &mesh.Workload{Namespace: "ns-a", Name: "pod-b", ServiceAccount: "sa-b", ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns-a/sa/sa-b"), Labels: map[string]string{"app": "b"}}
	m := &mesh.Mesh{Services: []*mesh.Service{
		{Namespace: "ns-a", Name: "a", Hostname: "a.ns-a.svc.cluster.local", Ports: []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP}},
			Endpoints: []mesh.Endpoint{{Address: "10.0.0.1", Workload: a}}},
		{Namespace: "ns-a", Name: "b", Hostname: "b.ns-a.svc.cluster.local", Ports: []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP}},
			Endpoints: []mesh.Endpoint{{Address: "10.0.0.2", Workload: b}}},
	}}
	return m, a, b
}

// firstResponse opens a stream (state-of-the-world or delta), sends one
// request for clusters and returns the first response's resource count or
// the stream's error.
func firstResponse(t *testing.T, c discoveryv3.AggregatedDiscoveryServiceClient, delta bool, node *corev3.Node) (int, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if delta {
		s, err := c.DeltaAggregatedResources(ctx)
		if err != nil {
			return 0, err
		}
		// A refused stream ends; Send then sees io.EOF and Recv the status.
		_ = s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: resource.ClusterType})
		resp, err := s.Recv()
		return len(resp.GetResources()), err
	}
	s, err := c.StreamAggregatedResources(ctx)
	if err != nil {
		return 0, err
	}
	_ = s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resource.ClusterType})
	resp, err := s.Recv()
	return len(resp.GetResources()), err
}

func TestStreamIdentity(t *testing.T) {
	m, a, b := twoPods()
	e := start(t, m, nil)
	certA := e.mint(a.ID)
	nodeA := meshtest.Node("sidecar", "10.0.0.1", a, false)
	// Pod B's node, claiming A's service account so that only the mesh
	// model can tell.
	nodeBasA := meshtest.Node("sidecar", "10.0.0.2", &mesh.Workload{Namespace: "ns-a", Name: "pod-b", ServiceAccount: "sa-a"}, false)
	otherNS := meshtest.Node("sidecar", "10.0.0.3", &mesh.Workload{Namespace: "ns-b", Name: "pod-x", ServiceAccount: "sa-a"}, false)
	otherSA := meshtest.Node("sidecar", "10.0.0.2", b, false)
	cases := []struct {
		name string
		cert *workloadCert
		node *corev3.Node
		want codes.Code
	}{
		{"no certificate", nil, nodeA, codes.Unauthenticated},
		{"another trust domain", foreignCert(t, "spiffe://other.example/ns/ns-a/sa/sa-a"), nodeA, codes.Unauthenticated},
		{"not a workload identity", e.mint(spiffeid.RequireFromString("spiffe://cluster.local/vm/db")), nodeA, codes.PermissionDenied},
		{"node in another namespace", certA, otherNS, codes.PermissionDenied},
		{"node of another service account", certA, otherSA, codes.PermissionDenied},
		{"node B's pod under A's certificate", certA, nodeBasA, codes.PermissionDenied},
		{"malformed node id", certA, &corev3.Node{Id: "pod-a"}, codes.InvalidArgument},
		{"own node", certA, nodeA, codes.OK},
	}
	for _, tc := range cases {
		for _, delta := range []bool{false, true} {
			t.Run(tc.name+map[bool]string{false: "/sotw", true: "/delta"}[delta], func(t *testing.T) {
				n, err := firstResponse(t, e.dialADS(tc.cert), delta, tc.node)
				if got := status.Code(err); got != tc.want {
					t.Fatalf("code = %s (%v), want %s", got, err, tc.want)
				}
				if tc.want == codes.OK && n == 0 {
					t.Fatal("no clusters in the response")
				}
			})
		}
	}
}

// TestNodeCannotChange: a stream that named one node may not switch to
// another.
func TestNodeCannotChange(t *testing.T) {
	m, a, _ := twoPods()
	e := start(t, m, nil)
	other := &mesh.Workload{Namespace: "ns-a", Name: "pod-c", ServiceAccount: "sa-a", Labels: a.Labels}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := e.dialADS(e.mint(a.ID)).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: meshtest.Node("sidecar", "10.0.0.1", a, false), TypeUrl: resource.ClusterType}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discoveryv3.DiscoveryRequest{Node: meshtest.Node("sidecar", "10.0.0.9", other, false), TypeUrl: resource.ListenerType}); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Recv(); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("Recv() = %v, want PermissionDenied", err)
	}
}
