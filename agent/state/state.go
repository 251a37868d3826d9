// Package state persists the agent's key, certificate and trust bundle in a
// state directory, for agents off Kubernetes: a join token works once, so an
// agent that restarts must renew with the certificate it already has.
//
// The directory and its files are owner-only. An existing directory or file
// that others can read is refused rather than used: the key in it may already
// be known to them.
package state

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"syscall"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// File names in the state directory. The key and the chain share one file so
// that they are replaced together.
const (
	SVIDFile   = "svid.pem"
	BundleFile = "bundle.pem"
)

// Errors Open and Load return.
var (
	// ErrInsecure: the directory or a file in it is accessible to others or
	// owned by another user.
	ErrInsecure = errors.New("state: state directory is not owner-only")
	// ErrEmpty: nothing has been saved yet.
	ErrEmpty = errors.New("state: no saved identity")
	// ErrCorrupt: a saved file cannot be read as written (empty, truncated,
	// overwritten, or the certificate without its bundle). The agent then
	// refuses to start rather than enrol again as a new identity.
	ErrCorrupt = errors.New("state: saved identity is corrupt")
)

// corruptHint ends every ErrCorrupt message: what the operator does.
const corruptHint = "restore the state directory from a backup, or empty it and enrol the agent again with a new join token"

// Dir is an owner-only state directory.
type Dir struct {
	path string
}

// Open creates the directory if needed (mode 0700) and checks that only
// its owner, this process's user, can use it.
func Open(path string) (*Dir, error) {
	if path == "" {
		return nil, errors.New("state: no directory")
	}
	if err := os.MkdirAll(path, 0o700); err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	if err := checkOwnerOnly(path); err != nil {
		return nil, err
	}
	return &Dir{path: path}, nil
}

// Path returns the directory.
func (d *Dir) Path() string { return d.path }

// Load returns the saved SVID and bundle, or ErrEmpty. It does not judge
// whether they are still valid.
func (d *Dir) Load() (*x509svid.SVID, *x509bundle.Bundle, error) {
	svidPEM, err := d.read(SVIDFile)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil, ErrEmpty
	}
	if err != nil {
		return nil, nil, err
	}
	bundlePEM, err := d.read(BundleFile)
	if errors.Is(err, fs.ErrNotExist) {
		// Save writes the bundle before the certificate, so a certificate
		// without its bundle is not what an interrupted Save leaves.
		return nil, nil, d.corrupt(BundleFile, "is missing beside "+SVIDFile, nil)
	}
	if err != nil {
		return nil, nil, err
	}
	var certs, key bytes.Buffer
	for rest := svidPEM; ; {
		var block *pem.Block
		if block, rest = pem.Decode(rest); block == nil {
			break
		}
		switch block.Type {
		case "CERTIFICATE":
			_ = pem.Encode(&certs, block)
		case "PRIVATE KEY":
			_ = pem.Encode(&key, block)
		}
	}
	s, err := x509svid.Parse(certs.Bytes(), key.Bytes())
	if err != nil {
		return nil, nil, d.corrupt(SVIDFile, fmt.Sprintf("is not a key and certificate chain (%d bytes)", len(svidPEM)), err)
	}
	b, err := x509bundle.Parse(s.ID.TrustDomain(), bundlePEM)
	if err == nil && b.Empty() {
		err = errors.New("no certificates")
	}
	if err != nil {
		return nil, nil, d.corrupt(BundleFile, fmt.Sprintf("is not a trust bundle (%d bytes)", len(bundlePEM)), err)
	}
	return s, b, nil
}

// corrupt returns ErrCorrupt naming the file's path and what is wrong.
func (d *Dir) corrupt(name, what string, cause error) error {
	if cause != nil {
		return fmt.Errorf("%w: %s %s (%w); %s", ErrCorrupt, filepath.Join(d.path, name), what, cause, corruptHint)
	}
	return fmt.Errorf("%w: %s %s; %s", ErrCorrupt, filepath.Join(d.path, name), what, corruptHint)
}

// Save replaces the saved SVID and bundle, each file atomically.
func (d *Dir) Save(s *x509svid.SVID, b *x509bundle.Bundle) error {
	certs, key, err := s.Marshal()
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	var roots bytes.Buffer
	for _, c := range b.X509Authorities() {
		_ = pem.Encode(&roots, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	// The bundle first: a saved SVID must always find its roots.
	if err := d.write(BundleFile, roots.Bytes()); err != nil {
		return err
	}
	return d.write(SVIDFile, append(key, certs...))
}

func (d *Dir) read(name string) ([]byte, error) {
	p := filepath.Join(d.path, name)
	if err := checkOwnerOnly(p); err != nil {
		return nil, err
	}
	b, err := os.ReadFile(p)
	if err != nil {
		return nil, fmt.Errorf("state: %w", err)
	}
	return b, nil
}

func (d *Dir) write(name string, data []byte) error {
	if err := atomicfile.WriteFile(filepath.Join(d.path, name), data, 0o600); err != nil {
		return fmt.Errorf("state: write %s: %w", name, err)
	}
	return nil
}

// checkOwnerOnly returns ErrInsecure unless path (not following a final
// symlink) belongs to this user and grants nothing to group or others.
// os.ErrNotExist passes through.
func checkOwnerOnly(path string) error {
	info, err := os.Lstat(path)
	if err != nil {
		return fmt.Errorf("state: %w", err)
	}
	if info.Mode()&fs.ModeSymlink != 0 {
		return fmt.Errorf("%w: %s is a symlink", ErrInsecure, path)
	}
	if perm := info.Mode().Perm(); perm&0o077 != 0 {
		return fmt.Errorf("%w: %s has mode %s", ErrInsecure, path, perm)
	}
	if st, ok := info.Sys().(*syscall.Stat_t); ok && int(st.Uid) != os.Geteuid() {
		return fmt.Errorf("%w: %s belongs to uid %d", ErrInsecure, path, st.Uid)
	}
	return nil
}

// Source is the agent's identity.
type Source interface {
	Load() (identity.Snapshot, <-chan struct{})
}

// PersisterConfig configures a Persister.
type PersisterConfig struct {
	Dir    *Dir
	Source Source
	Logger *slog.Logger
}

// Persister saves every new SVID and bundle.
type Persister struct {
	cfg PersisterConfig
}

// NewPersister returns a persister.
func NewPersister(cfg PersisterConfig) (*Persister, error) {
	if cfg.Dir == nil || cfg.Source == nil {
		return nil, errors.New("state: Dir and Source are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Persister{cfg: cfg}, nil
}

// Run saves until ctx ends and returns ctx.Err(), or the first save error.
func (p *Persister) Run(ctx context.Context) error {
	var saved identity.Snapshot
	for {
		snap, changed := p.cfg.Source.Load()
		if snap.Ready() && (snap.SVID != saved.SVID || snap.Bundle != saved.Bundle) {
			if err := p.cfg.Dir.Save(snap.SVID, snap.Bundle); err != nil {
				return err
			}
			saved = snap
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}
