package dirlock_test

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/internal/dirlock"
)

func TestTryLockRefusesASecondHolderAndNamesTheFirst(t *testing.T) {
	dir := t.TempDir()
	since := time.Date(2026, 12, 5, 15, 0, 0, 0, time.UTC)
	first, err := dirlock.TryLock(dir, "serve.lock", "trustmesh serve", since)
	if err != nil {
		t.Fatal(err)
	}
	_, err = dirlock.TryLock(dir, "serve.lock", "trustmesh serve", since.Add(time.Minute))
	var held *dirlock.HeldError
	if !errors.As(err, &held) {
		t.Fatalf("second TryLock: %v, want a *HeldError", err)
	}
	want := fmt.Sprintf("trustmesh serve pid %d since 2026-12-05T15:00:00Z", os.Getpid())
	if held.Holder != want || held.Dir != dir {
		t.Fatalf("held by %q in %q, want %q in %q", held.Holder, held.Dir, want, dir)
	}
	if err := first.Unlock(); err != nil {
		t.Fatal(err)
	}
	again, err := dirlock.TryLock(dir, "serve.lock", "trustmesh serve", since)
	if err != nil {
		t.Fatalf("TryLock after Unlock: %v", err)
	}
	_ = again.Unlock()
}

func TestTryLockNeedsTheDirectory(t *testing.T) {
	missing := t.TempDir() + "/missing"
	if _, err := dirlock.TryLock(missing, "serve.lock", "trustmesh serve", time.Now()); err == nil {
		t.Fatal("TryLock created a lock in a missing directory")
	}
	if _, err := os.Stat(missing); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("TryLock created %s", missing)
	}
}

func TestProbeSeesAHolderAndChangesNothing(t *testing.T) {
	dir := t.TempDir()
	if err := dirlock.Probe(dir, "serve.lock"); err != nil {
		t.Fatalf("Probe of a directory without a lock file: %v", err)
	}
	if _, err := os.Stat(dir + "/serve.lock"); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("Probe created the lock file")
	}
	since := time.Date(2026, 12, 5, 15, 0, 0, 0, time.UTC)
	l, err := dirlock.TryLock(dir, "serve.lock", "trustmesh serve", since)
	if err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(dir + "/serve.lock")
	var held *dirlock.HeldError
	if err := dirlock.Probe(dir, "serve.lock"); !errors.As(err, &held) || held.Holder != strings.TrimSpace(string(before)) {
		t.Fatalf("Probe of a held lock: %v, want a *HeldError naming %q", err, before)
	}
	_ = l.Unlock()
	if err := dirlock.Probe(dir, "serve.lock"); err != nil {
		t.Fatalf("Probe after Unlock: %v", err)
	}
	// The probe released what it took: a serve can lock it.
	again, err := dirlock.TryLock(dir, "serve.lock", "trustmesh serve", since)
	if err != nil {
		t.Fatalf("TryLock after Probe: %v", err)
	}
	_ = again.Unlock()
}
