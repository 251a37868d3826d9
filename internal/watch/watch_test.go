package watch_test

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/internal/watch"
)

// counter counts changed calls and lets a test wait for the next one.
type counter struct{ c chan struct{} }

func newCounter() *counter { return &counter{c: make(chan struct{}, 1024)} }

func (c *counter) changed() { c.c <- struct{}{} }

// drain forgets the events so far.
func (c *counter) drain() {
	for {
		select {
		case <-c.c:
		default:
			return
		}
	}
}

func (c *counter) wantChange(t *testing.T, what string) {
	t.Helper()
	select {
	case <-c.c:
	case <-time.After(5 * time.Second):
		t.Fatalf("%s: no change reported", what)
	}
}

func (c *counter) wantQuiet(t *testing.T, what string) {
	t.Helper()
	select {
	case <-c.c:
		t.Fatalf("%s: a change was reported", what)
	case <-time.After(300 * time.Millisecond):
	}
}

func start(t *testing.T, paths ...string) *counter {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	c := newCounter()
	done, err := watch.Paths(ctx, paths, c.changed)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("watch ended with %v, want nil when ctx ends", err)
			}
		case <-time.After(5 * time.Second):
			t.Error("watch did not end with ctx")
		}
	})
	return c
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestTreeSeesNewSubdirectories: a directory is watched as a tree, and a
// directory created under it later is watched too.
func TestTreeSeesNewSubdirectories(t *testing.T) {
	dir := t.TempDir()
	c := start(t, dir)
	write(t, filepath.Join(dir, "a.yaml"), "a")
	c.wantChange(t, "a file created in the tree")
	sub := filepath.Join(dir, "sub")
	if err := os.Mkdir(sub, 0o700); err != nil {
		t.Fatal(err)
	}
	c.wantChange(t, "a directory created in the tree")
	// The new directory's watch is added when its Create event is handled;
	// wait for that before writing into it.
	time.Sleep(100 * time.Millisecond)
	c.drain()
	write(t, filepath.Join(sub, "b.yaml"), "b")
	c.wantChange(t, "a file written in the new subdirectory")
}

// TestFileIgnoresItsNeighbours: a file is watched through its directory;
// its neighbours' changes are not its own, its replacement is.
func TestFileIgnoresItsNeighbours(t *testing.T) {
	dir := t.TempDir()
	f := filepath.Join(dir, "bundle.tar.gz")
	write(t, f, "v1")
	c := start(t, f)
	write(t, filepath.Join(dir, "other"), "x")
	c.wantQuiet(t, "a neighbour written")
	write(t, f+".tmp", "v2")
	c.drain()
	if err := os.Rename(f+".tmp", f); err != nil {
		t.Fatal(err)
	}
	c.wantChange(t, "the file replaced by a rename")
}

// TestConfigMapSymlinkSwap updates a file laid out as the kubelet lays out
// a ConfigMap volume (name -> ..data/name, ..data -> a timestamped
// directory) the way the kubelet does: a new directory, then a new ..data
// link renamed over the old. The file's own name sees no event.
func TestConfigMapSymlinkSwap(t *testing.T) {
	dir := t.TempDir()
	v1 := filepath.Join(dir, "..2026_01_01_00_00_00.1")
	if err := os.Mkdir(v1, 0o700); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(v1, "bundle.tar.gz"), "v1")
	if err := os.Symlink(filepath.Base(v1), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	f := filepath.Join(dir, "bundle.tar.gz")
	if err := os.Symlink(filepath.Join("..data", "bundle.tar.gz"), f); err != nil {
		t.Fatal(err)
	}
	c := start(t, f)

	v2 := filepath.Join(dir, "..2026_01_01_00_00_01.2")
	if err := os.Mkdir(v2, 0o700); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(v2, "bundle.tar.gz"), "v2")
	if err := os.Symlink(filepath.Base(v2), filepath.Join(dir, "..data_tmp")); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(filepath.Join(dir, "..data_tmp"), filepath.Join(dir, "..data")); err != nil {
		t.Fatal(err)
	}
	c.wantChange(t, "the ConfigMap's ..data link swapped")
	if got, err := os.ReadFile(f); err != nil || string(got) != "v2" {
		t.Fatalf("the file reads %q, %v after the swap; want v2", got, err)
	}
}

func TestMissingPathIsAnError(t *testing.T) {
	if _, err := watch.Paths(context.Background(), []string{filepath.Join(t.TempDir(), "absent")}, func() {}); err == nil {
		t.Fatal("watching a path that does not exist succeeded")
	}
}
