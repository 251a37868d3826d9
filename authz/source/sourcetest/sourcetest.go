// Package sourcetest is the contract every policy source passes (the
// directory and the Kubernetes source alike), run through the one Feed
// that publishes their snapshots: the same policies give the same
// snapshot, a refused update keeps the last good snapshot, and a change
// publishes exactly one new version.
package sourcetest

import (
	"context"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
)

// Store is one policy source under test and the means to change what it
// holds.
type Store interface {
	// Source is the PolicySource under test. Policies without a namespace
	// are in Namespace.
	Source() source.PolicySource
	Namespace() string
	// Put makes the source hold exactly docs: AuthorizationPolicy YAML
	// documents (security.istio.io/v1, no namespace) by name.
	Put(t *testing.T, docs map[string]string)
}

// Documents of the suite.
const (
	DenyAdmin = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin*"]}}]}]
`
	DenyOrders = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-orders}
spec:
  action: DENY
  rules: [{to: [{operation: {methods: ["DELETE"], paths: ["/orders/*"]}}]}]
`
	AllowWeb = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web}
spec:
  selector: {matchLabels: {app: web}}
  rules: [{from: [{source: {principals: ["cluster.local/ns/shop/sa/client"]}}]}]
`
	// Refused is valid Istio that trustmesh refuses (it cannot check
	// request principals), so every source can hold it.
	Refused = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt}
spec:
  rules: [{from: [{source: {requestPrincipals: ["iss/sub"]}}]}]
`
	// RefusedByEngine parses (policy.ParseYAML reads it) but the engine
	// refuses it (engine.CheckPolicy: a CUSTOM provider must be named
	// rego:<path>), so a source must refuse it as it refuses Refused: the
	// feed's subscribers would disagree otherwise, xDS serving a snapshot
	// that ext_authz refuses to load.
	RefusedByEngine = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom}
spec:
  action: CUSTOM
  provider: {name: ext-authz}
  rules: [{to: [{operation: {paths: ["/x"]}}]}]
`
)

// settle is the feed's quiet period in the suite; quiet is how long the
// suite waits to see that no further version follows a change.
const (
	settle = 50 * time.Millisecond
	quiet  = 750 * time.Millisecond
)

// Run runs the contract against the stores newStore returns.
func Run(t *testing.T, newStore func(t *testing.T) Store) {
	t.Run("same policies, same snapshot", func(t *testing.T) { sameSnapshot(t, newStore(t)) })
	t.Run("a change publishes one version; a refusal keeps the last good", func(t *testing.T) { changes(t, newStore(t)) })
}

// want is the digest of docs as policy.ParseYAML reads them.
func want(t *testing.T, ns string, docs ...string) string {
	t.Helper()
	var ps []*policy.Policy
	for _, d := range docs {
		p, err := policy.ParseYAML("suite", []byte(d), ns)
		if err != nil {
			t.Fatal(err)
		}
		ps = append(ps, p...)
	}
	return policy.Digest(ps)
}

type running struct {
	feed *source.Feed
	reg  *prometheus.Registry
	// changes receives a value for each snapshot published after the
	// first.
	changes chan struct{}
}

func start(t *testing.T, s Store) *running {
	t.Helper()
	r := &running{reg: prometheus.NewRegistry(), changes: make(chan struct{}, 64)}
	var err error
	r.feed, err = source.NewFeed(source.FeedConfig{Policies: s.Source(), Settle: settle, Registerer: r.reg})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.feed.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Feed.Run: %v", err)
		}
	})
	wctx, wcancel := context.WithTimeout(ctx, 30*time.Second)
	defer wcancel()
	if _, err := r.feed.Watch(ctx, func() { r.changes <- struct{}{} }); err != nil {
		if wctx.Err() != nil {
			t.Fatal("no first snapshot")
		}
		t.Fatal(err)
	}
	return r
}

// waitFor waits until the snapshot in force satisfies ok.
func (r *running) waitFor(t *testing.T, what string, ok func(*source.Snapshot) bool) *source.Snapshot {
	t.Helper()
	deadline := time.After(30 * time.Second)
	for {
		if s := r.feed.Current(); s != nil && ok(s) {
			return s
		}
		select {
		case <-r.changes:
		case <-time.After(20 * time.Millisecond):
		case <-deadline:
			t.Fatalf("%s: snapshot in force is %+v", what, r.feed.Current())
		}
	}
}

// steady checks that s stays in force for the quiet period: no further
// version follows.
func (r *running) steady(t *testing.T, what string, s *source.Snapshot) {
	t.Helper()
	time.Sleep(quiet)
	if got := r.feed.Current(); got != s {
		t.Fatalf("%s: version %d (%s) followed version %d (%s); want exactly one", what, got.Version, got.Digest, s.Version, s.Digest)
	}
	if got := metric(t, r.reg, "trustmesh_policy_snapshots_total"); got != float64(s.Version) {
		t.Fatalf("%s: trustmesh_policy_snapshots_total = %v, want %d", what, got, s.Version)
	}
}

// metric is the value of the feed's counter name.
func metric(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no metric %s", name)
	return 0
}

func sameSnapshot(t *testing.T, s Store) {
	s.Put(t, map[string]string{"deny-admin": DenyAdmin, "deny-orders": DenyOrders, "allow-web": AllowWeb})
	r := start(t, s)
	snap := r.feed.Current()
	if snap.Version != 1 {
		t.Fatalf("first snapshot is version %d, want 1", snap.Version)
	}
	if w := want(t, s.Namespace(), DenyAdmin, DenyOrders, AllowWeb); snap.Digest != w {
		t.Fatalf("digest %s, want %s: the source read different policies than the documents hold", snap.Digest, w)
	}
	var keys []string
	for _, p := range snap.Policies {
		keys = append(keys, p.Key())
	}
	ns := s.Namespace()
	if len(keys) != 3 || keys[0] != ns+"/allow-web" || keys[1] != ns+"/deny-admin" || keys[2] != ns+"/deny-orders" {
		t.Fatalf("policies %v, want allow-web, deny-admin, deny-orders sorted by key", keys)
	}
	if v, ps := r.feed.Policies(); v != 1 || len(ps) != 3 || &ps[0] != &snap.Policies[0] {
		t.Fatal("Policies() does not return the snapshot in force")
	}
	r.steady(t, "unchanged source", snap)
}

func changes(t *testing.T, s Store) {
	ns := s.Namespace()
	s.Put(t, map[string]string{"deny-admin": DenyAdmin})
	r := start(t, s)
	v1 := r.feed.Current()

	s.Put(t, map[string]string{"deny-admin": DenyAdmin, "deny-orders": DenyOrders})
	d2 := want(t, ns, DenyAdmin, DenyOrders)
	v2 := r.waitFor(t, "a policy added", func(s *source.Snapshot) bool { return s.Digest == d2 })
	if v2.Version != v1.Version+1 {
		t.Fatalf("a change published version %d after %d, want the next", v2.Version, v1.Version)
	}
	r.steady(t, "a policy added", v2)

	// A refused policy, one the parser refuses and one only the engine
	// does: nothing is published; the last good stays.
	for _, refused := range []struct{ name, doc string }{{"jwt", Refused}, {"custom", RefusedByEngine}} {
		before := metric(t, r.reg, "trustmesh_policy_refusals_total")
		s.Put(t, map[string]string{"deny-admin": DenyAdmin, "deny-orders": DenyOrders, refused.name: refused.doc})
		deadline := time.Now().Add(30 * time.Second)
		for metric(t, r.reg, "trustmesh_policy_refusals_total") == before {
			if time.Now().After(deadline) {
				t.Fatalf("the refused policy %s was not refused; the snapshot in force is version %d", refused.name, r.feed.Current().Version)
			}
			time.Sleep(20 * time.Millisecond)
		}
		r.steady(t, "a refused policy "+refused.name, v2)
		if _, err := s.Source().Policies(); err == nil {
			t.Fatalf("the source reads the refused policy %s without error", refused.name)
		}

		// Taking it out restores what is in force: no new version.
		s.Put(t, map[string]string{"deny-admin": DenyAdmin, "deny-orders": DenyOrders})
		deadline = time.Now().Add(30 * time.Second)
		for {
			if _, err := s.Source().Policies(); err == nil {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the source still refuses after the refused policy %s was removed", refused.name)
			}
			time.Sleep(20 * time.Millisecond)
		}
		r.steady(t, "the refused policy "+refused.name+" removed", v2)
	}

	// One more change, one more version.
	s.Put(t, map[string]string{"deny-orders": DenyOrders})
	d3 := want(t, ns, DenyOrders)
	v3 := r.waitFor(t, "a policy removed", func(s *source.Snapshot) bool { return s.Digest == d3 })
	if v3.Version != v2.Version+1 {
		t.Fatalf("a change published version %d after %d, want the next", v3.Version, v2.Version)
	}
	r.steady(t, "a policy removed", v3)
	if v1.Digest == v2.Digest || len(v1.Policies) != 1 || len(v2.Policies) != 2 {
		t.Fatal("a published snapshot changed after it was published")
	}
}
