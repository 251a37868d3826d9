package controlplane_test

import (
	"context"
	"slices"
	"testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/mesh"
)

// TestNodeModelAmbientFiles: off Kubernetes, an ambient Workload that names
// a node and a netns lets that node's agent hold its identity, attested by
// that network namespace (its node proxy presents it), with or without a
// Node file; a file workload of another mode naming the node gives it
// nothing, and a node no file names is still not trusted.
func TestNodeModelAmbientFiles(t *testing.T) {
	ctx := context.Background()
	m := &mesh.Mesh{Workloads: []*mesh.Workload{
		{Namespace: "demo", Name: "echo-0", ServiceAccount: "echo", ID: sa("demo", "echo"), Node: "node-a",
			Addresses: []string{"10.0.1.2"}, DataPlaneMode: mesh.DataPlaneAmbient, Netns: "echo-0"},
		{Namespace: "demo", Name: "web-0", ServiceAccount: "web", ID: sa("demo", "web"), Node: "node-a",
			Addresses: []string{"10.0.1.3"}, DataPlaneMode: mesh.DataPlaneSidecar},
		{Namespace: "demo", Name: "curl-0", ServiceAccount: "curl", ID: sa("demo", "curl"), Node: "node-b",
			Addresses: []string{"10.0.2.2"}, DataPlaneMode: mesh.DataPlaneNone},
	}}
	n, src, f := nodeModel(t, m, false)
	entries, _, err := n.Entries(ctx, "node-a")
	if err != nil || len(entries) != 1 || entries[0].ID != sa("demo", "echo") || !slices.Equal(entries[0].Selectors, []string{"netns:echo-0"}) {
		t.Fatalf("Entries(node-a) = %v, %v; want echo attested by netns:echo-0", entries, err)
	}
	if err := n.MayHold(ctx, "node-a", sa("demo", "echo")); err != nil {
		t.Fatal(err)
	}
	err = n.MayHold(ctx, "node-a", sa("demo", "web"))
	if _, isRefusal := ca.AsRefusal(err); err == nil || isRefusal {
		t.Fatalf("MayHold(node-a, web) = %v, want an error the CA makes not-on-node: a sidecar naming a node gives it nothing", err)
	}
	_, _, err = n.Entries(ctx, "node-b")
	wantRefusal(t, err, ca.ReasonNodeNotTrusted)
	wantRefusal(t, n.MayHold(ctx, "node-b", sa("demo", "curl")), ca.ReasonNodeNotTrusted)

	// With a Node file too, node-a holds both.
	src.m = &mesh.Mesh{Workloads: m.Workloads,
		Nodes: []*mesh.Node{{Name: "node-a", Workloads: []mesh.NodeWorkload{{ID: sa("demo", "db"), Selectors: []string{"unix:uid:70"}}}}}}
	if _, err := f.Load(); err != nil {
		t.Fatal(err)
	}
	entries, _, err = n.Entries(ctx, "node-a")
	if err != nil || len(entries) != 2 || entries[0].ID != sa("demo", "db") || entries[1].ID != sa("demo", "echo") {
		t.Fatalf("Entries(node-a) with a Node file = %v, %v; want db and echo", entries, err)
	}
}
