package mesh_test

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/internal/atomicfile"
	"github.com/trustmesh/trustmesh/mesh"
)

// fakeSource is a mesh.Source the test drives: set chooses what the next
// parse returns and change tells every watch. It counts the parses and
// watches made of it and reports when its watches end.
type fakeSource struct {
	parses, watches atomic.Int64

	mu      sync.Mutex
	m       *mesh.Mesh
	err     error
	changed []func()
	ended   []chan struct{}
}

func (s *fakeSource) set(m *mesh.Mesh, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.m, s.err = m, err
}

func (s *fakeSource) change() {
	s.mu.Lock()
	fns := append([]func(){}, s.changed...)
	s.mu.Unlock()
	for _, fn := range fns {
		fn()
	}
}

func (s *fakeSource) Mesh() (*mesh.Mesh, error) {
	s.parses.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.m, s.err
}

func (s *fakeSource) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	s.watches.Add(1)
	done, ended := make(chan error, 1), make(chan struct{})
	s.mu.Lock()
	s.changed = append(s.changed, changed)
	s.ended = append(s.ended, ended)
	s.mu.Unlock()
	go func() { <-ctx.Done(); close(ended); done <- nil }()
	return done, nil
}

// meshOf is a mesh of one workload, a new value on every call.
func meshOf(name string) *mesh.Mesh {
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/" + name)
	return &mesh.Mesh{Workloads: []*mesh.Workload{{Namespace: "shop", Name: name, ServiceAccount: name, ID: id}}}
}

func workloadFile(name string) string {
	return fmt.Sprintf(`apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: %[1]s, namespace: shop}
spec: {spiffeID: spiffe://cluster.local/ns/shop/sa/%[1]s}
`, name)
}

func writeMesh(t *testing.T, path, data string) {
	t.Helper()
	if err := atomicfile.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// feedFixture runs a Feed over a fakeSource that holds workload a, until
// the test ends, when it checks that Run ended the source's watch.
func feedFixture(t *testing.T) (*mesh.Feed, *fakeSource) {
	t.Helper()
	src := &fakeSource{}
	src.set(meshOf("a"), nil)
	feed, err := mesh.NewFeed(mesh.FeedConfig{Source: src, Settle: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- feed.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		src.mu.Lock()
		defer src.mu.Unlock()
		for _, e := range src.ended {
			select {
			case <-e:
			default:
				t.Error("the source's watch outlived the feed's Run")
			}
		}
	})
	select {
	case <-feed.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("no first snapshot")
	}
	return feed, src
}

// waitParses waits until the source has been parsed n times.
func waitParses(t *testing.T, src *fakeSource, n int64) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for src.parses.Load() < n {
		if time.Now().After(deadline) {
			t.Fatalf("the source was parsed %d times, want %d", src.parses.Load(), n)
		}
		time.Sleep(2 * time.Millisecond)
	}
}

type sub struct {
	changed chan struct{}
	done    <-chan error
	cancel  context.CancelFunc
}

func subscribe(t *testing.T, feed *mesh.Feed, n int) []sub {
	t.Helper()
	subs := make([]sub, n)
	for i := range subs {
		ctx, cancel := context.WithCancel(context.Background())
		t.Cleanup(cancel)
		ch := make(chan struct{}, 16)
		done, err := feed.Watch(ctx, func() { ch <- struct{}{} })
		if err != nil {
			t.Fatal(err)
		}
		subs[i] = sub{changed: ch, done: done, cancel: cancel}
	}
	return subs
}

func waitChanged(t *testing.T, subs []sub) {
	t.Helper()
	for i, s := range subs {
		select {
		case <-s.changed:
		case <-time.After(10 * time.Second):
			t.Fatalf("subscriber %d was not told of the new snapshot", i)
		}
	}
}

// checkShared asserts that the feed is on version and that every
// subscriber reads the snapshot's own mesh.
func checkShared(t *testing.T, feed *mesh.Feed, subs []sub, version uint64, workload string) *mesh.Mesh {
	t.Helper()
	snap := feed.Current()
	if snap == nil || snap.Version != version {
		t.Fatalf("feed on snapshot %+v, want version %d", snap, version)
	}
	if snap.Mesh.Workload("shop", workload) == nil {
		t.Fatalf("snapshot %d lacks workload %s", version, workload)
	}
	for i := range subs {
		m, err := feed.Mesh()
		if err != nil {
			t.Fatal(err)
		}
		if m != snap.Mesh {
			t.Fatalf("subscriber %d reads a different *Mesh than snapshot %d", i, version)
		}
	}
	return snap.Mesh
}

func TestFeedParsesOncePerChangeForEverySubscriber(t *testing.T) {
	feed, src := feedFixture(t)
	subs := subscribe(t, feed, 3)
	checkShared(t, feed, subs, 1, "a")

	for i, name := range []string{"b", "c"} {
		src.set(meshOf(name), nil)
		src.change()
		waitChanged(t, subs)
		checkShared(t, feed, subs, uint64(i+2), name)
	}
	if got := src.parses.Load(); got != 3 {
		t.Errorf("the source was parsed %d times for 3 subscribers, a first load and 2 changes; want 3", got)
	}
	if got := src.watches.Load(); got != 1 {
		t.Errorf("the source was watched %d times, want 1", got)
	}
}

func TestFeedKeepsTheLastGoodMeshForEverySubscriber(t *testing.T) {
	feed, src := feedFixture(t)
	subs := subscribe(t, feed, 2)
	good := checkShared(t, feed, subs, 1, "a")

	src.set(nil, mesh.ErrFile)
	src.change()
	waitParses(t, src, 2)
	if m := checkShared(t, feed, subs, 1, "a"); m != good {
		t.Fatal("a refused mesh replaced the last good one")
	}
	noChange(t, subs, "a refused mesh")

	src.set(meshOf("b"), nil)
	src.change()
	waitChanged(t, subs)
	checkShared(t, feed, subs, 2, "b")
}

func TestFeedPublishesNothingForTheSameMesh(t *testing.T) {
	feed, src := feedFixture(t)
	subs := subscribe(t, feed, 2)
	good := checkShared(t, feed, subs, 1, "a")

	src.set(meshOf("a"), nil)
	src.change()
	waitParses(t, src, 2)
	if m := checkShared(t, feed, subs, 1, "a"); m != good {
		t.Fatal("an unchanged mesh replaced the snapshot")
	}
	noChange(t, subs, "an unchanged mesh")
}

func noChange(t *testing.T, subs []sub, what string) {
	t.Helper()
	for i, s := range subs {
		select {
		case <-s.changed:
			t.Fatalf("subscriber %d was told of %s", i, what)
		default:
		}
	}
}

func TestFeedWatchesEndWithTheirContext(t *testing.T) {
	feed, src := feedFixture(t)
	subs := subscribe(t, feed, 2)
	subs[0].cancel()
	select {
	case err := <-subs[0].done:
		if err != nil {
			t.Fatalf("a watch ended by its context: %v, want nil", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("a watch outlived its context")
	}
	src.set(meshOf("b"), nil)
	src.change()
	waitChanged(t, subs[1:])
	noChange(t, subs[:1], "a change after its context ended")
	select {
	case err := <-subs[1].done:
		t.Fatalf("a live subscriber's watch ended: %v", err)
	default:
	}
}

// TestFeedOverADirectory runs the feed over mesh files: two subscribers
// read the mesh the files hold, and a bad file keeps the last good one.
func TestFeedOverADirectory(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "mesh.yaml")
	writeMesh(t, file, workloadFile("a"))
	feed, err := mesh.NewFeed(mesh.FeedConfig{Source: &mesh.Dir{Path: dir}, Settle: 10 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- feed.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	<-feed.Ready()
	subs := subscribe(t, feed, 2)
	good := checkShared(t, feed, subs, 1, "a")
	writeMesh(t, file, "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Bogus\nmetadata: {name: x}\n")
	time.Sleep(200 * time.Millisecond) // many settle periods
	if m := checkShared(t, feed, subs, 1, "a"); m != good {
		t.Fatal("a bad file replaced the last good mesh")
	}
	writeMesh(t, file, workloadFile("b"))
	waitChanged(t, subs)
	if m := checkShared(t, feed, subs, 2, "b"); m.Workload("shop", "a") != nil {
		t.Fatal("the new mesh still holds the old workload")
	}
}

func TestFeedWatchBeforeTheFirstSnapshotEndsWithContext(t *testing.T) {
	feed, err := mesh.NewFeed(mesh.FeedConfig{Source: mesh.Static{M: &mesh.Mesh{}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := feed.Mesh(); !errors.Is(err, mesh.ErrNoSnapshot) {
		t.Fatalf("Mesh before Run: %v, want ErrNoSnapshot", err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	if _, err := feed.Watch(ctx, func() {}); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Watch with no snapshot and an ended context: %v, want the context's error", err)
	}
}

func TestFeedRefusesAFirstBadMesh(t *testing.T) {
	dir := t.TempDir()
	writeMesh(t, filepath.Join(dir, "mesh.yaml"), "kind: Bogus\n")
	feed, err := mesh.NewFeed(mesh.FeedConfig{Source: &mesh.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	if err := feed.Run(context.Background()); !errors.Is(err, mesh.ErrFile) {
		t.Fatalf("Run over a bad mesh: %v, want ErrFile", err)
	}
	if feed.Current() != nil {
		t.Fatal("a refused first mesh was published")
	}
}
