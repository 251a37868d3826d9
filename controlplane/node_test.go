package controlplane_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/mesh"
)

// TestSelectorPrefixesAgree: the mesh model copies the node service's
// selector prefixes, so that it knows none of its consumers; they must be
// the same strings.
func TestSelectorPrefixesAgree(t *testing.T) {
	pairs := [][2]string{
		{mesh.SelectorUID, cav1.SelectorUID}, {mesh.SelectorGID, cav1.SelectorGID},
		{mesh.SelectorPath, cav1.SelectorPath}, {mesh.SelectorSHA256, cav1.SelectorSHA256},
		{mesh.SelectorNetns, cav1.SelectorNetns}, {mesh.SelectorPodUID, cav1.SelectorPodUID},
	}
	for _, p := range pairs {
		if p[0] != p[1] {
			t.Errorf("mesh selector prefix %q, node service's %q", p[0], p[1])
		}
	}
}

var nodeTD = spiffeid.RequireTrustDomainFromString("cluster.local")

func sa(ns, name string) spiffeid.ID {
	return spiffeid.RequireFromSegments(nodeTD, "ns", ns, "sa", name)
}

// switchable is a mesh source whose mesh a test replaces.
type switchable struct{ m *mesh.Mesh }

func (s *switchable) Mesh() (*mesh.Mesh, error) { return s.m, nil }
func (s *switchable) Watch(ctx context.Context, _ func()) (<-chan error, error) {
	return mesh.Static{}.Watch(ctx, nil)
}

func nodeModel(t *testing.T, m *mesh.Mesh, kubernetes bool) (*controlplane.NodeModel, *switchable, *mesh.Feed) {
	t.Helper()
	src := &switchable{m: m}
	f, err := mesh.NewFeed(mesh.FeedConfig{Source: src})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Load(); err != nil {
		t.Fatal(err)
	}
	return &controlplane.NodeModel{Mesh: f, TrustDomain: nodeTD, Kubernetes: kubernetes, Wait: 200 * time.Millisecond}, src, f
}

func wantRefusal(t *testing.T, err error, reason string) {
	t.Helper()
	r, ok := ca.AsRefusal(err)
	if !ok || r.Reason != reason {
		t.Fatalf("error = %v, want a refusal %s", err, reason)
	}
}

// TestNodeModelKubernetes: a node holds one entry per pod on it, attested
// by the pod UID, and only identities of its own pods; it finds a pod's
// node, and waits a bounded time for a pod it does not know.
func TestNodeModelKubernetes(t *testing.T) {
	ctx := context.Background()
	m := &mesh.Mesh{Workloads: []*mesh.Workload{
		{Namespace: "a", Name: "web-0", ServiceAccount: "web", ID: sa("a", "web"), Node: "node-a", UID: "uid-web-0"},
		{Namespace: "a", Name: "web-1", ServiceAccount: "web", ID: sa("a", "web"), Node: "node-a", UID: "uid-web-1"},
		{Namespace: "a", Name: "db-0", ServiceAccount: "db", ID: sa("a", "db"), Node: "node-b", UID: "uid-db-0"},
		{Namespace: "a", Name: "pending-0", ServiceAccount: "pending", ID: sa("a", "pending"), UID: "uid-pending-0"},
	}}
	n, src, f := nodeModel(t, m, true)
	entries, rev, err := n.Entries(ctx, "node-a")
	if err != nil {
		t.Fatal(err)
	}
	want := []ca.NodeEntry{
		{ID: sa("a", "web"), Selectors: []string{"k8s:pod-uid:uid-web-0"}},
		{ID: sa("a", "web"), Selectors: []string{"k8s:pod-uid:uid-web-1"}},
	}
	if len(entries) != len(want) || entries[0].Selectors[0] != want[0].Selectors[0] || entries[1].Selectors[0] != want[1].Selectors[0] || entries[0].ID != want[0].ID {
		t.Fatalf("Entries(node-a) = %v, want %v", entries, want)
	}
	if empty, _, err := n.Entries(ctx, "node-c"); err != nil || len(empty) != 0 {
		t.Fatalf("Entries(node-c) = %v, %v: a node with no pods holds nothing, and is no error on Kubernetes", empty, err)
	}
	if err := n.MayHold(ctx, "node-a", sa("a", "web")); err != nil {
		t.Fatalf("MayHold(node-a, web) = %v", err)
	}
	start := time.Now()
	for _, id := range []spiffeid.ID{sa("a", "db"), sa("a", "pending"), sa("a", "nobody")} {
		if err := n.MayHold(ctx, "node-a", id); err == nil {
			t.Fatalf("MayHold(node-a, %s) = nil: no pod of it runs on node-a", id)
		}
	}
	if d := time.Since(start); d < 3*200*time.Millisecond || d > 3*time.Second {
		t.Fatalf("three refusals took %s: each should wait the bounded 200ms", d)
	}
	// Within one delegated batch, the waits share one window
	// (review15-sec F4): three refusals take about one wait.
	batch := ca.WithBatchWait(ctx)
	start = time.Now()
	for _, id := range []spiffeid.ID{sa("a", "db"), sa("a", "pending"), sa("a", "nobody")} {
		if err := n.MayHold(batch, "node-a", id); err == nil {
			t.Fatalf("MayHold(node-a, %s) = nil in a batch", id)
		}
	}
	// Three waits of their own take 600ms at least; the bound leaves the
	// shared one 400ms of slack, for make test's loaded cores.
	if d := time.Since(start); d < 200*time.Millisecond || d >= 3*200*time.Millisecond {
		t.Fatalf("three refusals in one batch took %s: they should share one wait of 200ms", d)
	}
	if node, uid, err := n.NodeOfPod(ctx, "a", "db-0"); err != nil || node != "node-b" || uid != "uid-db-0" {
		t.Fatalf("NodeOfPod(a/db-0) = %q, %q, %v; want node-b and its UID", node, uid, err)
	}
	if node, _, err := n.NodeOfPod(ctx, "a", "pending-0"); err == nil {
		t.Fatalf("NodeOfPod(a/pending-0) = %q: an unscheduled pod is on no node", node)
	}

	// The pending pod is scheduled while the check waits.
	done := make(chan error, 1)
	go func() { done <- n.MayHold(ctx, "node-a", sa("a", "pending")) }()
	time.Sleep(50 * time.Millisecond)
	scheduled := *m.Workloads[3]
	scheduled.Node = "node-a"
	src.m = &mesh.Mesh{Workloads: []*mesh.Workload{m.Workloads[0], m.Workloads[1], m.Workloads[2], &scheduled}}
	if _, err := f.Load(); err != nil {
		t.Fatal(err)
	}
	if err := <-done; err != nil {
		t.Fatalf("MayHold of a pod scheduled during the wait = %v", err)
	}
	_, rev2, err := n.Entries(ctx, "node-a")
	if err != nil || rev2 == rev {
		t.Fatalf("the revision did not change with the entries: %s, %v", rev2, err)
	}
	_, rev3, _ := n.Entries(ctx, "node-a")
	if rev3 != rev2 {
		t.Fatalf("equal entries, revisions %s and %s", rev2, rev3)
	}

	// A cancelled caller stops waiting.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if err := n.MayHold(cctx, "node-a", sa("a", "nobody")); !errors.Is(err, context.Canceled) {
		t.Fatalf("MayHold with a cancelled context = %v", err)
	}
}

// TestNodeModelFiles: off Kubernetes a node holds what its Node lists; a
// node no file declares is not trusted; a Node section that fails
// validation leaves the last good one in force.
func TestNodeModelFiles(t *testing.T) {
	ctx := context.Background()
	m := &mesh.Mesh{Nodes: []*mesh.Node{{Name: "node-a", Workloads: []mesh.NodeWorkload{
		{ID: sa("demo", "web"), Selectors: []string{"unix:uid:1001"}},
	}}}}
	n, src, f := nodeModel(t, m, false)
	entries, _, err := n.Entries(ctx, "node-a")
	if err != nil || len(entries) != 1 || entries[0].ID != sa("demo", "web") || entries[0].Selectors[0] != "unix:uid:1001" {
		t.Fatalf("Entries(node-a) = %v, %v", entries, err)
	}
	if err := n.MayHold(ctx, "node-a", sa("demo", "web")); err != nil {
		t.Fatal(err)
	}
	err = n.MayHold(ctx, "node-a", sa("demo", "db"))
	if _, isRefusal := ca.AsRefusal(err); err == nil || isRefusal {
		t.Fatalf("MayHold(node-a, db) = %v, want an error the CA makes not-on-node", err)
	}
	_, _, err = n.Entries(ctx, "node-b")
	wantRefusal(t, err, ca.ReasonNodeNotTrusted)
	// At once, not after the wait: a batch of an undeclared node's
	// requests must not hold the CA's workers.
	n.Wait = 5 * time.Second
	start := time.Now()
	wantRefusal(t, n.MayHold(ctx, "node-b", sa("demo", "web")), ca.ReasonNodeNotTrusted)
	if d := time.Since(start); d > 2*time.Second {
		t.Fatalf("refusing an undeclared node took %s", d)
	}
	n.Wait = 200 * time.Millisecond

	// An invalid edit (a node's own identity) is refused as a whole.
	bad := &mesh.Mesh{Nodes: []*mesh.Node{{Name: "node-a", Workloads: []mesh.NodeWorkload{
		{ID: sa("demo", "web"), Selectors: []string{"unix:uid:1001"}},
		{ID: spiffeid.RequireFromSegments(nodeTD, "node", "node-b"), Selectors: []string{"unix:uid:0"}},
	}}, {Name: "node-b", Workloads: []mesh.NodeWorkload{{ID: sa("demo", "db"), Selectors: []string{"unix:uid:5"}}}}}}
	src.m = bad
	if _, err := f.Load(); err != nil {
		t.Fatal(err)
	}
	if entries, _, err := n.Entries(ctx, "node-a"); err != nil || len(entries) != 1 {
		t.Fatalf("after an invalid edit, Entries(node-a) = %v, %v: want the last good Node", entries, err)
	}
	_, _, err = n.Entries(ctx, "node-b")
	wantRefusal(t, err, ca.ReasonNodeNotTrusted)
}

func writeMesh(t *testing.T, dir, name, data string) {
	t.Helper()
	if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestTrustedNodeAccountsValidated: the flag takes namespace/serviceaccount
// pairs, on Kubernetes only.
func TestTrustedNodeAccountsValidated(t *testing.T) {
	for _, tc := range []struct {
		accounts []string
		kube     string
		want     string
	}{
		{[]string{"trustmesh-system"}, controlplane.KubernetesOn, "not namespace/serviceaccount"},
		{[]string{"Trustmesh/node"}, controlplane.KubernetesOn, "not namespace/serviceaccount"},
		{[]string{"ns/"}, controlplane.KubernetesOn, "not namespace/serviceaccount"},
		{[]string{"a/b/c"}, controlplane.KubernetesOn, "not namespace/serviceaccount"},
		{[]string{"trustmesh-system/node"}, controlplane.KubernetesOff, "need Kubernetes"},
	} {
		cfg := controlplane.Config{DataDir: t.TempDir(), Kubernetes: controlplane.KubernetesConfig{Mode: tc.kube}}
		cfg.CA.TrustedNodeAccounts = tc.accounts
		err := cfg.Validate()
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "trusted-node-accounts") {
			t.Errorf("TrustedNodeAccounts %q (kubernetes %s): Validate() = %v, want %q", tc.accounts, tc.kube, err, tc.want)
		}
	}
	cfg := controlplane.Config{DataDir: t.TempDir(), Kubernetes: controlplane.KubernetesConfig{Mode: controlplane.KubernetesOn}}
	cfg.CA.TrustedNodeAccounts = []string{"trustmesh-system/trustmesh-node"}
	if err := cfg.Validate(); err != nil && strings.Contains(err.Error(), "trusted-node-accounts") {
		t.Fatalf("a valid account: %v", err)
	}
}
