package atomicfile

import (
	"bytes"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
)

func TestWriteFileContentAndMode(t *testing.T) {
	old := syscall.Umask(0o077) // the mode must not depend on the umask
	defer syscall.Umask(old)
	for _, perm := range []fs.FileMode{0o600, 0o644, 0o400} {
		t.Run(perm.String(), func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "f")
			if err := os.WriteFile(path, []byte("old content, longer than the new"), 0o666); err != nil {
				t.Fatal(err)
			}
			if err := WriteFile(path, []byte("new"), perm); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(path)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != "new" {
				t.Errorf("content = %q, want %q", got, "new")
			}
			info, err := os.Stat(path)
			if err != nil {
				t.Fatal(err)
			}
			if info.Mode().Perm() != perm {
				t.Errorf("mode = %v, want %v", info.Mode().Perm(), perm)
			}
			assertOnly(t, dir, "f")
		})
	}
}

// Writers of one path race: each must succeed, and a reader at any moment
// must see exactly one writer's whole content. A fixed temporary name fails
// this: one writer renames or truncates the other's file.
func TestConcurrentWritersNeverTearOrFail(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "state")
	const writers, rounds, size = 8, 40, 64 << 10
	content := func(w int) []byte { return bytes.Repeat([]byte{byte('a' + w)}, size) }
	if err := WriteFile(path, content(0), 0o600); err != nil {
		t.Fatal(err)
	}

	stop := make(chan struct{})
	readerDone := make(chan error, 1)
	go func() {
		for {
			select {
			case <-stop:
				readerDone <- nil
				return
			default:
			}
			got, err := os.ReadFile(path)
			if err != nil {
				readerDone <- fmt.Errorf("read: %w", err)
				return
			}
			if len(got) != size || !bytes.Equal(got, bytes.Repeat(got[:1], size)) {
				readerDone <- fmt.Errorf("torn or mixed file: %d bytes, first %q", len(got), got[:min(len(got), 1)])
				return
			}
		}
	}()

	var wg sync.WaitGroup
	errs := make(chan error, writers*rounds)
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range rounds {
				if err := WriteFile(path, content(w), 0o600); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(stop)
	close(errs)
	for err := range errs {
		t.Errorf("writer failed: %v", err)
	}
	if err := <-readerDone; err != nil {
		t.Error(err)
	}
	assertOnly(t, dir, "state")
}

func TestWriteFileErrorLeavesNothing(t *testing.T) {
	dir := t.TempDir()
	// A directory where the file should go: the rename fails.
	target := filepath.Join(dir, "target")
	if err := os.Mkdir(target, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := WriteFile(target, []byte("x"), 0o600); err == nil {
		t.Fatal("WriteFile over a directory succeeded")
	}
	if info, err := os.Stat(target); err != nil || !info.IsDir() {
		t.Errorf("target changed: %v %v", info, err)
	}
	assertOnly(t, dir, "target")

	if err := WriteFile(filepath.Join(dir, "missing", "f"), []byte("x"), 0o600); err == nil {
		t.Error("WriteFile into a missing directory succeeded")
	}
	assertOnly(t, dir, "target")
}

func TestSymlinkReplaces(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(dir, "current")
	for _, target := range []string{"v1", "v2", "v2"} {
		if err := Symlink(target, link); err != nil {
			t.Fatal(err)
		}
		got, err := os.Readlink(link)
		if err != nil {
			t.Fatal(err)
		}
		if got != target {
			t.Errorf("link -> %q, want %q", got, target)
		}
	}
	assertOnly(t, dir, "current")
}

func TestConcurrentSymlinks(t *testing.T) {
	dir := t.TempDir()
	link := filepath.Join(dir, "current")
	var wg sync.WaitGroup
	errs := make(chan error, 8*40)
	for w := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 40 {
				if err := Symlink(fmt.Sprintf("v%d", w), link); err != nil {
					errs <- err
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Errorf("Symlink failed: %v", err)
	}
	assertOnly(t, dir, "current")
}

// assertOnly fails unless dir holds exactly the named entries: no temporary
// file is left behind.
func assertOnly(t *testing.T, dir string, names ...string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, e := range entries {
		got = append(got, e.Name())
	}
	if fmt.Sprint(got) != fmt.Sprint(names) {
		t.Errorf("%s holds %v, want %v", dir, got, names)
	}
}
