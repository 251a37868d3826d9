package xds_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds"
)

// feedPolicy is a DENY policy on path.
func feedPolicy(path string) string {
	return `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: ns-a}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["` + path + `"]}}]}]
`
}

// TestServerFollowsThePolicyFeed runs the server on the policy feed that
// ext_authz follows in a control plane (authz/source.Feed over a policy
// directory): it serves nothing before the feed's first snapshot, pushes
// each snapshot the feed publishes and names its version, and pushes
// nothing for an update the feed refuses.
func TestServerFollowsThePolicyFeed(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(file+".tmp", []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			t.Fatal(err)
		}
	}
	write(feedPolicy("/admin"))
	feed, err := source.NewFeed(source.FeedConfig{Policies: &source.Dir{Path: dir}, Settle: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	clk := clocktesting.NewFakeClock(time.Now())
	srv, err := xds.New(xds.Config{Bundle: fakeBundle{}, Mesh: mesh.Static{M: &mesh.Mesh{}}, Policies: feed,
		Proxy: testProxy(), Log: testLog(), Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	srvDone := runResult(ctx, srv)
	feedDone := make(chan error, 1)
	defer func() {
		cancel()
		if err := waitRun(t, srvDone); err != nil {
			t.Errorf("xds Run: %v", err)
		}
		if err := <-feedDone; err != nil {
			t.Errorf("feed Run: %v", err)
		}
	}()
	select {
	case <-srv.Ready():
		t.Fatal("the server was ready before the feed published a snapshot")
	case <-time.After(200 * time.Millisecond):
	}
	go func() { feedDone <- feed.Run(ctx) }()
	select {
	case <-srv.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("the server did not become ready on the feed's first snapshot")
	}
	if got := srv.PolicyVersion(); got != 1 || feed.Current().Version != 1 {
		t.Fatalf("server on policy version %d, feed on %d; want 1 and 1", got, feed.Current().Version)
	}

	// stepUntil advances the server's debounce until cond holds.
	stepUntil := func(what string, cond func() bool) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for !cond() {
			if time.Now().After(deadline) {
				t.Fatalf("%s: server on policy version %d after %d pushes", what, srv.PolicyVersion(), srv.Pushes())
			}
			if clk.HasWaiters() {
				clk.Step(xds.DefaultDebounce)
			}
			time.Sleep(time.Millisecond)
		}
	}
	pushes := srv.Pushes()
	write(feedPolicy("/secret"))
	stepUntil("a new snapshot", func() bool { return srv.PolicyVersion() == 2 })
	if feed.Current().Version != 2 || srv.Pushes() != pushes+1 {
		t.Fatalf("feed on version %d, %d pushes for one change", feed.Current().Version, srv.Pushes()-pushes)
	}

	// A refused update: the feed publishes nothing, so nothing is pushed.
	write("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: x}\nspec: {nonsense: 1}\n")
	deadline := time.Now().Add(2 * time.Second)
	for time.Now().Before(deadline) {
		if clk.HasWaiters() {
			clk.Step(xds.DefaultDebounce)
		}
		time.Sleep(5 * time.Millisecond)
	}
	if srv.PolicyVersion() != 2 || srv.Pushes() != pushes+1 || feed.Current().Version != 2 {
		t.Fatalf("after a refused update: server on version %d after %d more pushes, feed on %d; want 2, 1, 2",
			srv.PolicyVersion(), srv.Pushes()-pushes, feed.Current().Version)
	}
}

// TestDumpNamesThePoliciesInForce: `xds dump` of a policy directory
// prints the digest that a feed over the same directory publishes, and so
// the policy_digest a control plane's decision log records.
func TestDumpNamesThePoliciesInForce(t *testing.T) {
	feed, err := source.NewFeed(source.FeedConfig{Policies: &source.Dir{Path: "testdata/policies", DefaultNamespace: "default"}})
	if err != nil {
		t.Fatal(err)
	}
	snap, err := feed.Load()
	if err != nil {
		t.Fatal(err)
	}
	got, err := xds.Dump(goldenRequest("sidecar~10.0.1.1~productpage-v1-0.bookinfo~bookinfo.svc.cluster.local", false))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(got), `"policy_digest": "`+snap.Digest+`"`) {
		t.Fatalf("the dump does not name the policies' digest %s", snap.Digest)
	}
}
