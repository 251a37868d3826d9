package rotation_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"errors"
	"math/big"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
)

// taintWorld is a serving manager over a directory, on a fake clock, that
// records into a real journal.
type taintWorld struct {
	t     *testing.T
	ctx   context.Context
	clk   *clocktesting.FakeClock
	jr    *journal.Store
	dir   string
	mgr   *rotation.Manager
	leafN int64
}

func newTaintWorld(t *testing.T) *taintWorld {
	t.Helper()
	ctx := context.Background()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, _, err := journal.NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	jr, err := journal.Open(ctx, journal.Config{DSN: filepath.Join(t.TempDir(), "journal.db"), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { jr.Close() })
	w := &taintWorld{t: t, ctx: ctx, clk: clocktesting.NewFakeClock(t0), jr: jr, dir: t.TempDir()}
	w.mgr = w.serving(jr)
	if _, err := w.mgr.Initial(ctx); err != nil {
		t.Fatal(err)
	}
	return w
}

func (w *taintWorld) serving(rec rotation.Recorder) *rotation.Manager {
	w.t.Helper()
	m, err := rotation.New(rotation.Config{Dir: w.dir, TrustDomain: td, Clock: w.clk, Recorder: rec, Log: quiet,
		MaxWorkloadTTL: time.Hour, Interval: time.Minute})
	if err != nil {
		w.t.Fatal(err)
	}
	return m
}

func (w *taintWorld) material() *authority.Material {
	w.t.Helper()
	mat, _, err := w.mgr.Material(w.ctx, w.clk.Now())
	if err != nil {
		w.t.Fatal(err)
	}
	return mat
}

// issue signs a leaf valid for ttl under the CA in force and journals it as
// the CA does.
func (w *taintWorld) issue(ttl time.Duration) (*x509.Certificate, *authority.Material) {
	w.t.Helper()
	mat := w.material()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		w.t.Fatal(err)
	}
	w.leafN++
	now := w.clk.Now()
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1000 + w.leafN), Subject: pkix.Name{CommonName: "leaf"},
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(ttl), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, mat.Cert, &key.PublicKey, mat.Signer)
	if err != nil {
		w.t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	if _, err := w.jr.RecordIssuance(w.ctx, journal.Issuance{Time: now, Serial: leaf.SerialNumber.Text(16),
		SPIFFEID: "spiffe://cluster.local/ns/a/sa/b", Method: "x509-renewal", Origin: journal.OriginKubernetes,
		NotBefore: leaf.NotBefore, NotAfter: leaf.NotAfter, Issuer: mat.Cert.SerialNumber.Text(16)}, nil); err != nil {
		w.t.Fatal(err)
	}
	return leaf, mat
}

// rotations lists the journal's rotation records as "step role serial".
func (w *taintWorld) rotations() []string {
	w.t.Helper()
	entries, err := w.jr.Entries(w.ctx, 0, 10000)
	if err != nil {
		w.t.Fatal(err)
	}
	var out []string
	for _, e := range entries {
		if e.Kind != journal.KindRotation {
			continue
		}
		rec, err := e.Decode()
		if err != nil {
			w.t.Fatal(err)
		}
		r := rec.(*journal.Rotation)
		out = append(out, r.Step+" "+r.Role+" "+r.Serial)
	}
	return out
}

func (w *taintWorld) tick() {
	w.t.Helper()
	if _, err := w.mgr.Tick(w.ctx); err != nil {
		w.t.Fatal(err)
	}
}

func (w *taintWorld) tainted() int {
	w.t.Helper()
	ts, err := w.mgr.TaintedCertificates(w.ctx)
	if err != nil {
		w.t.Fatal(err)
	}
	return len(ts)
}

// verifies reports whether leaf, with its chain, verifies under roots at now.
func verifies(leaf *x509.Certificate, chain, roots []*x509.Certificate, now time.Time) bool {
	rp, ip := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range roots {
		rp.AddCert(r)
	}
	for _, c := range chain {
		ip.AddCert(c)
	}
	_, err := leaf.Verify(x509.VerifyOptions{Roots: rp, Intermediates: ip, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	return err == nil
}

func hex(c *x509.Certificate) string { return c.SerialNumber.Text(16) }

// TestTaint: tainting the active intermediate, then the root, activates a
// replacement at once, journals taint, prepare and activate, keeps the
// tainted authority (a root in the bundle) until the journal's last leaf
// under it has expired and not a tick before, then retires it, after which
// a relying party with the bundle rejects a leaf of the tainted root.
func TestTaint(t *testing.T) {
	for _, tc := range []struct {
		name string
		root bool
	}{{"intermediate", false}, {"root", true}} {
		t.Run(tc.name, func(t *testing.T) {
			w := newTaintWorld(t)
			leaf, old := w.issue(30 * time.Minute)
			w.clk.Step(10 * time.Minute)

			victim, err := w.mgr.Taint(w.ctx, tc.root)
			if err != nil {
				t.Fatal(err)
			}
			want := old.Cert
			if tc.root {
				want = old.Anchor
			}
			if !victim.Equal(want) {
				t.Fatalf("tainted %s, want the active %s %s", hex(victim), tc.name, hex(want))
			}
			now := w.material()
			if now.Cert.Equal(old.Cert) {
				t.Fatal("the tainted intermediate still signs")
			}
			if tc.root == now.Anchor.Equal(old.Anchor) {
				t.Fatalf("after tainting the %s the active root changed: %v", tc.name, !now.Anchor.Equal(old.Anchor))
			}
			verifyMaterial(t, now, w.clk.Now())
			if !verifies(leaf, old.Chain, now.Roots, w.clk.Now()) {
				t.Fatal("a still-valid leaf of the tainted authority stopped verifying before its expiry")
			}
			if w.tainted() != 1 {
				t.Fatal("the tainted certificate is not listed")
			}
			wantSteps := []string{"taint " + tc.name + " " + hex(victim)}
			if tc.root {
				wantSteps = append(wantSteps, "prepare root "+hex(now.Anchor))
			}
			wantSteps = append(wantSteps, "prepare intermediate "+hex(now.Cert), "activate intermediate "+hex(now.Cert), "activate root "+hex(now.Anchor))
			if got := w.rotations(); !slices.Equal(got, wantSteps) {
				t.Fatalf("journal rotation records\n got %q\nwant %q", got, wantSteps)
			}

			// The leaf expires 20m after the taint: kept until then.
			w.clk.Step(19 * time.Minute)
			w.tick()
			if w.tainted() != 1 {
				t.Fatal("the tainted authority left before its last leaf expired")
			}
			w.clk.Step(time.Minute)
			w.tick()
			if w.tainted() != 0 {
				t.Fatal("the tainted authority stayed after its last leaf expired")
			}
			got := w.rotations()
			if last := got[len(got)-1]; last != "retire "+tc.name+" "+hex(victim) {
				t.Fatalf("last journal record %q, want the tainted %s's retirement", last, tc.name)
			}
			after := w.material()
			if tc.root {
				if slices.ContainsFunc(after.Roots, victim.Equal) {
					t.Fatal("the tainted root is still in the bundle")
				}
				// A leaf the stolen key signs now, with a fresh validity,
				// is rejected by a relying party with the new bundle.
				forged := forge(t, old, w.clk.Now())
				if verifies(forged, old.Chain, after.Roots, w.clk.Now()) {
					t.Fatal("a leaf of the tainted root verifies under the bundle after its retirement")
				}
			}
			w.tick()
			if n := len(w.rotations()); n != len(got) {
				t.Fatalf("a further tick recorded %d more steps", n-len(got))
			}
		})
	}
}

// forge signs a leaf valid at now with the tainted material's key, as the
// holder of a stolen key would.
func forge(t *testing.T, mat *authority.Material, now time.Time) *x509.Certificate {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(99), NotBefore: now.Add(-time.Minute), NotAfter: now.Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, mat.Cert, &key.PublicKey, mat.Signer)
	if err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	return c
}

// failingRecorder records until fail is set, as a process killed between
// writing the state and journalling the step leaves things.
type failingRecorder struct {
	*journal.Store
	fail bool
}

var errKilled = errors.New("killed")

func (f *failingRecorder) RecordRotation(ctx context.Context, r journal.Rotation) error {
	if f.fail {
		return errKilled
	}
	return f.Store.RecordRotation(ctx, r)
}

// TestReconcileAfterACrashBetweenStateAndJournal: a step whose state was
// written but whose journal record was not (the process died between the
// two) is recorded by the next serving manager's first tick, once, so that
// the state and the journal agree, and rotation goes on from the state.
func TestReconcileAfterACrashBetweenStateAndJournal(t *testing.T) {
	for _, tc := range []struct {
		name string
		step func(*rotation.Manager, *failingRecorder, context.Context) error
		want []string
	}{
		{"prepare", func(m *rotation.Manager, _ *failingRecorder, ctx context.Context) error { return m.Prepare(ctx, false) },
			[]string{"prepare intermediate"}},
		{"activate", func(m *rotation.Manager, fr *failingRecorder, ctx context.Context) error {
			fr.fail = false
			if err := m.Prepare(ctx, false); err != nil {
				return err
			}
			fr.fail = true
			return m.Activate(ctx, false)
		}, []string{"prepare intermediate", "activate intermediate", "activate root"}},
		{"taint", func(m *rotation.Manager, _ *failingRecorder, ctx context.Context) error {
			_, err := m.Taint(ctx, false)
			return err
		},
			[]string{"taint intermediate", "prepare intermediate", "activate intermediate", "activate root"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := newTaintWorld(t)
			fr := &failingRecorder{Store: w.jr, fail: true}
			killed := w.serving(fr)
			if err := tc.step(killed, fr, w.ctx); !errors.Is(err, errKilled) {
				t.Fatalf("step returned %v, want the journal failure", err)
			}
			if got := w.rotations(); len(got) >= len(tc.want) {
				t.Fatalf("journal holds %q before the restart", got)
			}
			st, err := w.mgr.ReadState(w.ctx)
			if err != nil {
				t.Fatal(err)
			}
			restarted := w.serving(w.jr)
			for range 2 {
				if _, err := restarted.Tick(w.ctx); err != nil {
					t.Fatal(err)
				}
			}
			var got []string
			for _, r := range w.rotations() {
				f := strings.Fields(r)
				got = append(got, f[0]+" "+f[1])
			}
			if !slices.Equal(got, tc.want) {
				t.Fatalf("after the restart the journal holds %q, want %q", got, tc.want)
			}
			after, err := restarted.ReadState(w.ctx)
			if err != nil {
				t.Fatal(err)
			}
			if after.Active != st.Active || after.Next != st.Next || after.LastGeneration != st.LastGeneration {
				t.Fatalf("the restart changed the state: %+v, was %+v", after, st)
			}
		})
	}
}
