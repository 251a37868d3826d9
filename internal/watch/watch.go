// Package watch reports changes to files and directory trees: the one
// file watcher that the mesh's directory source and the policy feed share.
//
// A directory is watched as a tree: every directory below it, including
// ones created later. A file is watched through its parent directory, so
// that editors that replace the file, rather than write it in place, are
// seen. A file that is a symlink, as the files of a Kubernetes ConfigMap or
// Secret volume are ("name -> ..data/name"), changes without an event on
// its own name: the kubelet swaps the "..data" link beside it. Every
// change in such a file's directory therefore counts.
//
// Watch reports that something may have changed; it does not say what, and
// it does not debounce. Callers re-read their input and settle bursts on
// their own clock.
package watch

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/fsnotify/fsnotify"
)

// ErrClosed reports a watcher that stopped delivering events while its
// context was live: its owner would otherwise go on serving stale input.
var ErrClosed = errors.New("watch: watcher closed")

// Paths watches files and directory trees and calls changed after every
// event that may have changed one of them, until ctx ends. It returns once
// the watches are in place, so that no change after it returns is missed.
// The channel receives the watch's final error: nil when ctx ended.
func Paths(ctx context.Context, paths []string, changed func()) (<-chan error, error) {
	fw, err := fsnotify.NewWatcher()
	if err != nil {
		return nil, fmt.Errorf("watch: %w", err)
	}
	w := &watcher{fw: fw, files: map[string]bool{}, fileDirs: map[string]bool{}, linkDirs: map[string]bool{}, trees: map[string]bool{}}
	for _, p := range paths {
		if err := w.add(p); err != nil {
			fw.Close()
			return nil, err
		}
	}
	done := make(chan error, 1)
	go func() {
		defer fw.Close()
		done <- w.loop(ctx, changed)
	}()
	return done, nil
}

type watcher struct {
	fw       *fsnotify.Watcher
	files    map[string]bool // watched files
	fileDirs map[string]bool // their parent directories
	linkDirs map[string]bool // parent directories of watched symlinks: every event counts
	trees    map[string]bool // directories watched as trees
}

func (w *watcher) add(p string) error {
	abs, err := filepath.Abs(p)
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return fmt.Errorf("watch: %w", err)
	}
	if fi.IsDir() {
		return w.addTree(abs)
	}
	dir := filepath.Dir(abs)
	w.files[abs] = true
	w.fileDirs[dir] = true
	if li, err := os.Lstat(abs); err == nil && li.Mode()&os.ModeSymlink != 0 {
		w.linkDirs[dir] = true
	}
	if err := w.fw.Add(dir); err != nil {
		return fmt.Errorf("watch: watching %s: %w", abs, err)
	}
	return nil
}

func (w *watcher) addTree(root string) error {
	return filepath.WalkDir(root, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return fmt.Errorf("watch: %w", err)
		}
		if d.IsDir() {
			if err := w.fw.Add(p); err != nil {
				return fmt.Errorf("watch: watching %s: %w", p, err)
			}
			w.trees[p] = true
		}
		return nil
	})
}

// relevant reports whether an event may change a watched path.
func (w *watcher) relevant(name string) bool {
	dir := filepath.Dir(name)
	return w.trees[dir] || w.linkDirs[dir] || w.files[name] || w.trees[name]
}

func (w *watcher) loop(ctx context.Context, changed func()) error {
	for {
		select {
		case <-ctx.Done():
			return nil
		case ev, ok := <-w.fw.Events:
			if !ok {
				return ErrClosed
			}
			if !w.relevant(ev.Name) {
				continue // another file beside a watched file
			}
			if ev.Has(fsnotify.Create) && w.trees[filepath.Dir(ev.Name)] {
				if fi, err := os.Stat(ev.Name); err == nil && fi.IsDir() {
					// A directory that vanishes before it is walked is
					// reported by its own Remove event.
					_ = w.addTree(ev.Name)
				}
			}
			changed()
		case err, ok := <-w.fw.Errors:
			if !ok {
				return ErrClosed
			}
			return fmt.Errorf("watch: %w", err)
		}
	}
}
