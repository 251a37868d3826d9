// Package dirlock holds a directory for one process at a time with the
// kernel's advisory lock (flock) on a lock file inside it. The lock ends with
// the process that held it, however it ends, so a crash never leaves a stale
// lock behind; the file only says who holds it, for the refusal message.
package dirlock

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

// Lock is a held directory lock.
type Lock struct {
	f *os.File
}

// HeldError is returned by TryLock when another process holds the lock.
type HeldError struct {
	Dir string
	// Holder is what the holder wrote in the lock file ("trustmesh serve
	// pid 1234 since 2026-12-05T15:00:00Z"); empty when it wrote nothing.
	Holder string
}

func (e *HeldError) Error() string {
	if e.Holder == "" {
		return fmt.Sprintf("data dir %s is in use by another process", e.Dir)
	}
	return fmt.Sprintf("data dir %s is in use by %s", e.Dir, e.Holder)
}

// TryLock takes the lock file name in dir without waiting, and records in
// it that what (for example "trustmesh serve") holds it, with its PID and
// start time. dir must exist. When another process holds it, the error is a
// *HeldError naming that process.
func TryLock(dir, name, what string, now time.Time) (*Lock, error) {
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("dirlock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		defer f.Close()
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return nil, &HeldError{Dir: dir, Holder: holder(path)}
		}
		return nil, fmt.Errorf("dirlock: lock %s: %w", path, err)
	}
	holder := fmt.Sprintf("%s pid %d since %s\n", what, os.Getpid(), now.UTC().Format(time.RFC3339))
	if err := f.Truncate(0); err == nil {
		_, err = f.WriteAt([]byte(holder), 0)
	}
	if err != nil {
		_ = f.Close()
		return nil, fmt.Errorf("dirlock: %w", err)
	}
	return &Lock{f: f}, nil
}

// Probe reports whether another process holds the lock file name in dir,
// without creating or writing anything: it opens the lock file read-only if
// it exists, tries the lock without waiting, and releases it at once. A
// missing lock file is not held. When another process holds it, the error is
// a *HeldError naming that process.
func Probe(dir, name string) error {
	path := filepath.Join(dir, name)
	f, err := os.Open(path)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("dirlock: %w", err)
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX|syscall.LOCK_NB); err != nil {
		if errors.Is(err, syscall.EWOULDBLOCK) {
			return &HeldError{Dir: dir, Holder: holder(path)}
		}
		return fmt.Errorf("dirlock: lock %s: %w", path, err)
	}
	return syscall.Flock(int(f.Fd()), syscall.LOCK_UN)
}

// holder reads who holds the lock file at path. A holder that has only just
// taken the lock writes its name a moment later, so an empty file is read
// again for a little while.
func holder(path string) string {
	for range 20 {
		b, _ := os.ReadFile(path)
		if h := strings.TrimSpace(string(b)); h != "" {
			return h
		}
		time.Sleep(5 * time.Millisecond)
	}
	return ""
}

// Wait takes the lock file name in dir, waiting while another process or
// Lock holds it. It records no holder: it is for short critical sections.
func Wait(dir, name string) (*Lock, error) {
	path := filepath.Join(dir, name)
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("dirlock: %w", err)
	}
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		f.Close()
		return nil, fmt.Errorf("dirlock: lock %s: %w", path, err)
	}
	return &Lock{f: f}, nil
}

// Unlock releases the lock. The lock file stays: removing it would let a
// process that opened it before the removal lock a file nobody else sees.
func (l *Lock) Unlock() error {
	if l == nil || l.f == nil {
		return nil
	}
	err := syscall.Flock(int(l.f.Fd()), syscall.LOCK_UN)
	if cerr := l.f.Close(); err == nil {
		err = cerr
	}
	l.f = nil
	return err
}
