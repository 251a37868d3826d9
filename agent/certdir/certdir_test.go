package certdir

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td  = spiffeid.RequireTrustDomainFromString("cluster.local")
	own = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
)

func issue(t *testing.T, auth *testca.Authority) *x509svid.SVID {
	t.Helper()
	return auth.SVID(t, own, time.Now().Add(-time.Minute), time.Hour)
}

// read loads the three files the way a proxyless gRPC workload does and
// checks they belong together.
func read(t *testing.T, dir string) (tls.Certificate, *x509.CertPool, *x509.Certificate) {
	t.Helper()
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, CertChainFile), filepath.Join(dir, KeyFile))
	if err != nil {
		t.Fatalf("cert-chain.pem and key.pem do not form a key pair: %v", err)
	}
	rootPEM, err := os.ReadFile(filepath.Join(dir, RootCertFile))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(rootPEM) {
		t.Fatal("root-cert.pem holds no certificates")
	}
	leaf, err := x509.ParseCertificate(pair.Certificate[0])
	if err != nil {
		t.Fatal(err)
	}
	inter := x509.NewCertPool()
	for _, der := range pair.Certificate[1:] {
		c, _ := x509.ParseCertificate(der)
		inter.AddCert(c)
	}
	if _, err := leaf.Verify(x509.VerifyOptions{Roots: pool, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("cert-chain.pem does not verify under root-cert.pem: %v", err)
	}
	return pair, pool, leaf
}

func TestWriteAndRotate(t *testing.T) {
	auth := testca.New(t, td, time.Now())
	dir := filepath.Join(t.TempDir(), "certs")
	// Files left by an older layout are replaced.
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, KeyFile), []byte("stale"), 0o600); err != nil {
		t.Fatal(err)
	}
	store := identity.New()
	w, err := New(Config{Dir: dir, Source: store})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- w.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v", err)
		}
	}()

	store.SetBundle(auth.Bundle())
	first := issue(t, auth)
	store.SetSVID(first)
	waitFor(t, func() bool { _, err := os.Stat(filepath.Join(dir, CertChainFile)); return err == nil }, "first write")

	// A reader polls the files throughout the rotations below. Resolving
	// ..data once, it must never see a certificate with another version's
	// key; the version it resolved may vanish under it, and it retries.
	stopReader := make(chan struct{})
	readerDone := make(chan error, 1)
	go func() {
		reads := 0
		for {
			select {
			case <-stopReader:
				if reads == 0 {
					readerDone <- errors.New("reader never read")
					return
				}
				readerDone <- nil
				return
			default:
			}
			version, err := filepath.EvalSymlinks(filepath.Join(dir, dataLink))
			if err == nil {
				_, err = tls.LoadX509KeyPair(filepath.Join(version, CertChainFile), filepath.Join(version, KeyFile))
			}
			if err != nil && !errors.Is(err, os.ErrNotExist) {
				readerDone <- err
				return
			}
			reads++
		}
	}()

	for i := range 5 {
		s := issue(t, auth)
		store.SetSVID(s)
		waitFor(t, func() bool {
			_, err := os.Stat(filepath.Join(dir, CertChainFile))
			if err != nil {
				return false
			}
			pair, err := tls.LoadX509KeyPair(filepath.Join(dir, CertChainFile), filepath.Join(dir, KeyFile))
			// The old version is removed right after the switch.
			return err == nil && string(pair.Certificate[0]) == string(s.Certificates[0].Raw) && countVersions(t, dir) == 1
		}, "files to hold the new certificate")
		_, _, leaf := read(t, dir)
		if !leaf.Equal(s.Certificates[0]) {
			t.Fatalf("rotation %d: files hold serial %s", i, leaf.SerialNumber)
		}
		checkLayout(t, dir)
	}
	close(stopReader)
	if err := <-readerDone; err != nil {
		t.Fatalf("reader saw an inconsistent key pair during rotation: %v", err)
	}
}

func countVersions(t *testing.T, dir string) int {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), versionPrefix) {
			n++
		}
	}
	return n
}

// checkLayout checks owner-only modes and that exactly one version exists.
func checkLayout(t *testing.T, dir string) {
	t.Helper()
	entries, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	versions := 0
	for _, e := range entries {
		if strings.HasPrefix(e.Name(), versionPrefix) {
			versions++
			info, _ := e.Info()
			if info.Mode().Perm() != 0o700 {
				t.Fatalf("version directory mode %s, want 0700", info.Mode().Perm())
			}
		}
		if strings.HasSuffix(e.Name(), ".tmp") {
			t.Fatalf("temporary %s left behind", e.Name())
		}
	}
	if versions != 1 {
		t.Fatalf("%d version directories, want 1", versions)
	}
	for _, name := range []string{CertChainFile, KeyFile, RootCertFile} {
		info, err := os.Stat(filepath.Join(dir, name))
		if err != nil {
			t.Fatal(err)
		}
		if info.Mode().Perm() != 0o600 {
			t.Fatalf("%s mode %s, want 0600", name, info.Mode().Perm())
		}
		if target, err := os.Readlink(filepath.Join(dir, name)); err != nil || target != filepath.Join(dataLink, name) {
			t.Fatalf("%s is not a link through %s: %q, %v", name, dataLink, target, err)
		}
	}
}

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}
