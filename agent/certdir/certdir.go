// Package certdir writes the agent's identity to a directory in Istio's file
// layout, for workloads that read certificates from files (proxyless gRPC):
//
//	cert-chain.pem  the certificate chain, leaf first
//	key.pem         the private key (PKCS #8)
//	root-cert.pem   the trust bundle's roots
//
// All three change together, the way Kubernetes updates secret volumes: each
// version is written to a fresh directory, a "..data" symlink is switched to
// it with one rename, and the three names are symlinks through "..data". A
// reader that resolves "..data" once reads one consistent version. A reader
// that opens the names one by one may, during a switch, pair a certificate
// with the previous key, and must retry, as with a secret volume; gRPC's
// pemfile provider keeps its previous credentials when a pair does not
// match. Everything is owner-only.
package certdir

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"

	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/internal/atomicfile"
)

// The file names, as Istio names them.
const (
	CertChainFile = "cert-chain.pem"
	KeyFile       = "key.pem"
	RootCertFile  = "root-cert.pem"

	dataLink      = "..data"
	versionPrefix = "..version-"
)

// Source is the agent's identity.
type Source interface {
	Load() (identity.Snapshot, <-chan struct{})
}

// Config configures a Writer.
type Config struct {
	Dir    string
	Source Source
	Logger *slog.Logger
}

// Writer keeps Dir equal to the identity.
type Writer struct {
	cfg Config
}

// New returns a writer.
func New(cfg Config) (*Writer, error) {
	if cfg.Dir == "" || cfg.Source == nil {
		return nil, errors.New("certdir: Dir and Source are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Writer{cfg: cfg}, nil
}

// Run writes every new SVID or bundle until ctx ends, and returns ctx.Err(),
// or the first write error. An SVID withdrawn at expiry leaves the files as
// they are.
func (w *Writer) Run(ctx context.Context) error {
	var written identity.Snapshot
	for {
		snap, changed := w.cfg.Source.Load()
		if snap.Ready() && (snap.SVID != written.SVID || snap.Bundle != written.Bundle) {
			if err := w.Write(snap); err != nil {
				return err
			}
			written = snap
			w.cfg.Logger.Info("certificate files updated", "dir", w.cfg.Dir, "spiffe_id", snap.SVID.ID.String())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

// Write replaces the three files with snap's SVID and bundle as one change.
func (w *Writer) Write(snap identity.Snapshot) error {
	if !snap.Ready() {
		return errors.New("certdir: no SVID and bundle to write")
	}
	chain, key, err := snap.SVID.Marshal()
	if err != nil {
		return fmt.Errorf("certdir: %w", err)
	}
	var roots bytes.Buffer
	for _, c := range snap.Bundle.X509Authorities() {
		_ = pem.Encode(&roots, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	dir := w.cfg.Dir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return fmt.Errorf("certdir: %w", err)
	}
	version, err := os.MkdirTemp(dir, versionPrefix)
	if err != nil {
		return fmt.Errorf("certdir: %w", err)
	}
	// On the first write the names are linked in this order, the chain
	// last, so a reader that waits for cert-chain.pem finds all three.
	files := []struct {
		name string
		data []byte
	}{
		{RootCertFile, roots.Bytes()},
		{KeyFile, key},
		{CertChainFile, chain},
	}
	for _, f := range files {
		if err := writeFile(filepath.Join(version, f.name), f.data); err != nil {
			_ = os.RemoveAll(version)
			return err
		}
	}
	if err := syncDir(version); err != nil {
		_ = os.RemoveAll(version)
		return err
	}
	// The switch: one rename makes all three files the new version.
	if err := replaceSymlink(filepath.Base(version), filepath.Join(dir, dataLink)); err != nil {
		_ = os.RemoveAll(version)
		return err
	}
	for _, f := range files {
		link := filepath.Join(dir, f.name)
		want := filepath.Join(dataLink, f.name)
		if target, err := os.Readlink(link); err == nil && target == want {
			continue
		}
		if err := replaceSymlink(want, link); err != nil {
			return err
		}
	}
	if err := syncDir(dir); err != nil {
		return err
	}
	return removeOldVersions(dir, filepath.Base(version))
}

func writeFile(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return fmt.Errorf("certdir: %w", err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("certdir: write %s: %w", path, err)
	}
	return nil
}

// replaceSymlink points link at target atomically, replacing whatever link
// was.
func replaceSymlink(target, link string) error {
	if err := atomicfile.Symlink(target, link); err != nil {
		return fmt.Errorf("certdir: %w", err)
	}
	return nil
}

func syncDir(dir string) error {
	if err := atomicfile.SyncDir(dir); err != nil {
		return fmt.Errorf("certdir: %w", err)
	}
	return nil
}

func removeOldVersions(dir, current string) error {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return fmt.Errorf("certdir: %w", err)
	}
	for _, e := range entries {
		if e.IsDir() && strings.HasPrefix(e.Name(), versionPrefix) && e.Name() != current {
			if err := os.RemoveAll(filepath.Join(dir, e.Name())); err != nil {
				return fmt.Errorf("certdir: %w", err)
			}
		}
	}
	return nil
}
