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

	"github.com/trustmesh/trustmesh/internal/atomicfile"
	"github.com/trustmesh/trustmesh/mesh"
)

// counting is a mesh.Source that counts the parses and watches made of it
// and reports when its watches end.
type counting struct {
	mesh.Source
	parses, watches atomic.Int64
	mu              sync.Mutex
	ended           []chan struct{}
}

func (c *counting) Mesh() (*mesh.Mesh, error) {
	c.parses.Add(1)
	return c.Source.Mesh()
}

func (c *counting) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	c.watches.Add(1)
	done, err := c.Source.Watch(ctx, changed)
	if err != nil {
		return nil, err
	}
	out, ended := make(chan error, 1), make(chan struct{})
	c.mu.Lock()
	c.ended = append(c.ended, ended)
	c.mu.Unlock()
	go func() { err := <-done; close(ended); out <- err }()
	return out, nil
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

// feedFixture runs a Feed over a counting mesh directory until the test ends.
func feedFixture(t *testing.T) (*mesh.Feed, *counting, string) {
	t.Helper()
	dir := t.TempDir()
	file := filepath.Join(dir, "mesh.yaml")
	writeMesh(t, file, workloadFile("a"))
	src := &counting{Source: &mesh.Dir{Path: dir}}
	feed, err := mesh.NewFeed(mesh.FeedConfig{Source: src, Settle: 20 * time.Millisecond})
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
	return feed, src, file
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
	feed, src, file := feedFixture(t)
	subs := subscribe(t, feed, 3)
	checkShared(t, feed, subs, 1, "a")

	for i, name := range []string{"b", "c"} {
		writeMesh(t, file, workloadFile(name))
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
	feed, src, file := feedFixture(t)
	subs := subscribe(t, feed, 2)
	good := checkShared(t, feed, subs, 1, "a")

	writeMesh(t, file, "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Bogus\nmetadata: {name: x}\n")
	deadline := time.Now().Add(10 * time.Second)
	for src.parses.Load() < 2 {
		if time.Now().After(deadline) {
			t.Fatal("the bad file was never read")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if m := checkShared(t, feed, subs, 1, "a"); m != good {
		t.Fatal("a refused mesh replaced the last good one")
	}
	for i, s := range subs {
		select {
		case <-s.changed:
			t.Fatalf("subscriber %d was told of a refused mesh", i)
		default:
		}
	}

	writeMesh(t, file, workloadFile("b"))
	waitChanged(t, subs)
	checkShared(t, feed, subs, 2, "b")
}

func TestFeedWatchesEndWithTheirContext(t *testing.T) {
	feed, _, file := feedFixture(t)
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
	writeMesh(t, file, workloadFile("b"))
	waitChanged(t, subs[1:])
	select {
	case <-subs[0].changed:
		t.Fatal("a subscriber whose context ended was still told of changes")
	default:
	}
	select {
	case err := <-subs[1].done:
		t.Fatalf("a live subscriber's watch ended: %v", err)
	default:
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
