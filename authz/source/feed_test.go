package source_test

import (
	"context"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
)

// TestSubscribersShareOneSnapshot runs one feed with two subscribers, the
// engine's Loader and a second one as the xDS server is: both hold the very
// policies the feed parsed, once, and every decision names the snapshot's
// version and digest.
func TestSubscribersShareOneSnapshot(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.yaml")
	write(t, file, denyPath("/admin"))
	feed, err := source.NewFeed(source.FeedConfig{Policies: &source.Dir{Path: dir}, Settle: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	e := engine.New()
	loads := make(chan error, 16)
	l, err := source.New(source.Config{Engine: e, Feed: feed, OnLoad: func(err error) { loads <- err }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	feedDone, loaderDone := make(chan error, 1), make(chan error, 1)
	go func() { loaderDone <- l.Run(ctx) }()
	go func() { feedDone <- feed.Run(ctx) }()
	defer func() {
		cancel()
		for _, c := range []chan error{feedDone, loaderDone} {
			if err := <-c; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	}()
	other := make(chan struct{}, 16)
	if _, err := feed.Watch(ctx, func() { other <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	waitLoad := func() {
		t.Helper()
		select {
		case err := <-loads:
			if err != nil {
				t.Fatal(err)
			}
		case <-time.After(10 * time.Second):
			t.Fatal("the loader did not load")
		}
	}
	check := func(version uint64) {
		t.Helper()
		snap := feed.Current()
		if snap.Version != version {
			t.Fatalf("feed on version %d, want %d", snap.Version, version)
		}
		d, err := e.Check(ctx, req("/x"))
		if err != nil {
			t.Fatal(err)
		}
		if d.PolicyVersion != snap.Version || d.PolicyDigest != snap.Digest {
			t.Fatalf("decision names policy version %d (%s), want the feed's %d (%s)", d.PolicyVersion, d.PolicyDigest, snap.Version, snap.Digest)
		}
		v, ps := feed.Policies()
		set := e.Current().Policies()
		if v != version || len(ps) != 1 || len(set) != 1 || ps[0] != set[0] || ps[0] != snap.Policies[0] {
			t.Fatal("the engine and the other subscriber do not hold the snapshot's own policies")
		}
	}
	waitLoad()
	check(1)

	writeAtomic(t, file, denyPath("/secret"))
	select {
	case <-other:
	case <-time.After(10 * time.Second):
		t.Fatal("the other subscriber was not told of the new snapshot")
	}
	waitLoad()
	check(2)
	if allowed(t, e, "/admin") == false || allowed(t, e, "/secret") {
		t.Fatal("the new snapshot is not in force")
	}
}

// TestSubscribersAgreeOnARefusal: a policy file that parses but that the
// engine refuses (a CUSTOM provider not named rego:<path>) is refused by
// the feed itself, so its subscribers never disagree: the xDS server
// serves the feed's snapshot in force, and the engine's set names that
// very version and digest, not an older one it kept while the feed moved
// on.
func TestSubscribersAgreeOnARefusal(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "p.yaml"), denyPath("/admin"))
	feed, err := source.NewFeed(source.FeedConfig{Policies: &source.Dir{Path: dir}, Settle: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	e := engine.New()
	loads := make(chan error, 16)
	l, err := source.New(source.Config{Engine: e, Feed: feed, OnLoad: func(err error) { loads <- err }})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	feedDone, loaderDone := make(chan error, 1), make(chan error, 1)
	go func() { loaderDone <- l.Run(ctx) }()
	go func() { feedDone <- feed.Run(ctx) }()
	defer func() {
		cancel()
		for _, c := range []chan error{feedDone, loaderDone} {
			if err := <-c; err != nil {
				t.Errorf("Run: %v", err)
			}
		}
	}()
	select {
	case err := <-loads:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("the loader did not load")
	}

	writeAtomic(t, filepath.Join(dir, "q.yaml"), `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: custom, namespace: default}
spec:
  action: CUSTOM
  provider: {name: ext-authz}
  rules: [{to: [{operation: {paths: ["/x"]}}]}]
`)
	// Long enough for the feed to settle, read and publish or refuse, and
	// for the loader to follow.
	time.Sleep(time.Second)
	snap := feed.Current()
	d, err := e.Check(ctx, req("/x"))
	if err != nil {
		t.Fatal(err)
	}
	if snap.Version != 1 || d.PolicyVersion != snap.Version || d.PolicyDigest != snap.Digest {
		t.Fatalf("feed (and so xDS) on version %d (%s), the engine decides on %d (%s); want both on 1, the last good",
			snap.Version, snap.Digest, d.PolicyVersion, d.PolicyDigest)
	}
	if _, err := (&source.Dir{Path: dir}).Policies(); err == nil || !strings.Contains(err.Error(), "spec.provider.name") {
		t.Fatalf("the directory reads the policy the engine refuses with error %v; want its refusal of spec.provider.name", err)
	}
}
