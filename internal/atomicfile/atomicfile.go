// Package atomicfile replaces files and symlinks so that a reader, a
// concurrent writer or a crash sees the old content or the new, never a mix,
// and so that a replacement that returned nil survives a power cut.
//
// Each write goes to a uniquely named temporary file in the target's
// directory (never a fixed ".tmp" name, which two writers would share), is
// fsynced, given its mode, renamed over the target, and then the directory is
// fsynced so the rename itself is durable. This is SPIRE's diskutil, once.
package atomicfile

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
)

// WriteFile replaces path with data and mode perm (umask is not applied).
// On error the target is unchanged and no temporary file is left behind.
func WriteFile(path string, data []byte, perm fs.FileMode) (err error) {
	dir, base := filepath.Split(path)
	if dir == "" {
		dir = "."
	}
	// CreateTemp opens the file 0600, so the data is never readable by
	// others before the mode below is set.
	f, err := os.CreateTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			_ = os.Remove(tmp)
		}
	}()
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if err == nil {
		err = f.Chmod(perm)
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("atomicfile: write %s: %w", path, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	return SyncDir(dir)
}

// Symlink points link at target, replacing whatever link was, in one rename.
func Symlink(target, link string) (err error) {
	dir, base := filepath.Split(link)
	if dir == "" {
		dir = "."
	}
	// A unique name: os.Symlink cannot create over an existing name, so
	// reserve one with MkdirTemp's randomness and use a name inside it.
	tmpDir, err := os.MkdirTemp(dir, "."+base+".tmp-*")
	if err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	defer os.RemoveAll(tmpDir)
	tmp := filepath.Join(tmpDir, base)
	if err := os.Symlink(target, tmp); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	if err := os.Rename(tmp, link); err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	return SyncDir(dir)
}

// SyncDir fsyncs a directory, making the renames and creations in it durable.
func SyncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("atomicfile: %w", err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("atomicfile: sync %s: %w", dir, err)
	}
	return nil
}
