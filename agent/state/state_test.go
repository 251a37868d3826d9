package state

import (
	"context"
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
	"github.com/trustmesh/trustmesh/agent/svid"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td  = spiffeid.RequireTrustDomainFromString("cluster.local")
	own = spiffeid.RequireFromString("spiffe://cluster.local/vm/db-1")
)

func issue(t *testing.T, auth *testca.Authority) *x509svid.SVID {
	t.Helper()
	return auth.SVID(t, own, time.Now().Add(-time.Minute), time.Hour)
}

func TestSaveLoadRoundTrip(t *testing.T) {
	auth := testca.New(t, td, time.Now())
	path := filepath.Join(t.TempDir(), "state")
	d, err := Open(path)
	if err != nil {
		t.Fatal(err)
	}
	if info, _ := os.Stat(path); info.Mode().Perm() != 0o700 {
		t.Fatalf("state directory mode %s, want 0700", info.Mode().Perm())
	}
	if _, _, err := d.Load(); !errors.Is(err, ErrEmpty) {
		t.Fatalf("empty directory: %v, want ErrEmpty", err)
	}
	s := issue(t, auth)
	if err := d.Save(s, auth.Bundle()); err != nil {
		t.Fatal(err)
	}
	for _, name := range []string{SVIDFile, BundleFile} {
		info, err := os.Stat(filepath.Join(path, name))
		if err != nil || info.Mode().Perm() != 0o600 {
			t.Fatalf("%s: %v, mode %v; want 0600", name, err, info.Mode().Perm())
		}
	}
	got, bundle, err := d.Load()
	if err != nil {
		t.Fatal(err)
	}
	if got.ID != own || !got.Certificates[0].Equal(s.Certificates[0]) || len(got.Certificates) != 2 {
		t.Fatal("loaded SVID differs from the saved one")
	}
	if !bundle.Equal(auth.Bundle()) {
		t.Fatal("loaded bundle differs from the saved one")
	}
	// The loaded key is the saved key: it still verifies as the same SVID.
	if _, err := svid.Verify(svid.VerifyRequest{Chain: got.Certificates, Key: got.PrivateKey, Bundle: bundle, Want: own, Now: time.Now()}); err != nil {
		t.Fatalf("loaded identity does not verify: %v", err)
	}
}

func TestRefusesLooseDirectory(t *testing.T) {
	auth := testca.New(t, td, time.Now())
	t.Run("directory readable by others", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state")
		if err := os.Mkdir(path, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(path, 0o755); err != nil {
			t.Fatal(err)
		}
		if _, err := Open(path); !errors.Is(err, ErrInsecure) {
			t.Fatalf("Open: %v, want ErrInsecure", err)
		}
	})
	t.Run("key file readable by group", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state")
		d, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Save(issue(t, auth), auth.Bundle()); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(filepath.Join(path, SVIDFile), 0o640); err != nil {
			t.Fatal(err)
		}
		if _, _, err := d.Load(); !errors.Is(err, ErrInsecure) {
			t.Fatalf("Load: %v, want ErrInsecure", err)
		}
	})
	t.Run("key file is a symlink", func(t *testing.T) {
		path := filepath.Join(t.TempDir(), "state")
		d, err := Open(path)
		if err != nil {
			t.Fatal(err)
		}
		if err := d.Save(issue(t, auth), auth.Bundle()); err != nil {
			t.Fatal(err)
		}
		elsewhere := filepath.Join(t.TempDir(), "svid.pem")
		if err := os.Rename(filepath.Join(path, SVIDFile), elsewhere); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(elsewhere, filepath.Join(path, SVIDFile)); err != nil {
			t.Fatal(err)
		}
		if _, _, err := d.Load(); !errors.Is(err, ErrInsecure) {
			t.Fatalf("Load: %v, want ErrInsecure", err)
		}
	})
}

func TestPersisterSavesRotations(t *testing.T) {
	auth := testca.New(t, td, time.Now())
	d, err := Open(filepath.Join(t.TempDir(), "state"))
	if err != nil {
		t.Fatal(err)
	}
	store := identity.New()
	p, err := NewPersister(PersisterConfig{Dir: d, Source: store})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v", err)
		}
	}()
	store.SetBundle(auth.Bundle())
	for range 2 {
		s := issue(t, auth)
		store.SetSVID(s)
		deadline := time.Now().Add(10 * time.Second)
		for {
			got, _, err := d.Load()
			if err == nil && got.Certificates[0].Equal(s.Certificates[0]) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatal("rotation not saved")
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
}

// TestLoadRefusesCorruptFiles: a saved certificate or bundle that is empty,
// truncated or garbage, or a certificate whose bundle is missing, is
// ErrCorrupt naming the file, never ErrEmpty (which makes the agent enrol
// again as a new identity). A bundle without a certificate is what a Save
// interrupted between its two writes leaves: that stays ErrEmpty.
func TestLoadRefusesCorruptFiles(t *testing.T) {
	auth := testca.New(t, td, time.Now())
	cases := []struct {
		name, file string
		corrupt    func(b []byte) []byte // nil removes the file
		want       error
	}{
		{"svid empty", SVIDFile, func([]byte) []byte { return nil }, ErrCorrupt},
		{"svid truncated", SVIDFile, func(b []byte) []byte { return b[:len(b)/2] }, ErrCorrupt},
		{"svid garbage", SVIDFile, func([]byte) []byte { return []byte("\x00\x01garbage") }, ErrCorrupt},
		{"bundle empty", BundleFile, func([]byte) []byte { return nil }, ErrCorrupt},
		{"bundle truncated", BundleFile, func(b []byte) []byte { return b[:len(b)/2] }, ErrCorrupt},
		{"bundle missing", BundleFile, nil, ErrCorrupt},
		{"svid missing (interrupted first save)", SVIDFile, nil, ErrEmpty},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "state")
			d, err := Open(path)
			if err != nil {
				t.Fatal(err)
			}
			if err := d.Save(issue(t, auth), auth.Bundle()); err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(path, tc.file)
			if tc.corrupt == nil {
				err = os.Remove(p)
			} else {
				b, _ := os.ReadFile(p)
				err = os.WriteFile(p, tc.corrupt(b), 0o600)
			}
			if err != nil {
				t.Fatal(err)
			}
			_, _, err = d.Load()
			if !errors.Is(err, tc.want) {
				t.Fatalf("Load = %v, want %v", err, tc.want)
			}
			if tc.want == ErrCorrupt && !strings.Contains(err.Error(), p) {
				t.Fatalf("error %q does not name %s", err, p)
			}
		})
	}
}
