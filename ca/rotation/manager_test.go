package rotation_test

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// t0 is whole seconds, as certificate times are.
var t0 = time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)

// recorder keeps the rotation steps a manager records.
type recorder struct {
	mu    sync.Mutex
	steps []journal.Rotation
}

func (r *recorder) RecordRotation(_ context.Context, rot journal.Rotation) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.steps = append(r.steps, rot)
	return nil
}

func (r *recorder) list() []string {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []string
	for _, s := range r.steps {
		out = append(out, s.Step+" "+s.Role)
	}
	return out
}

// suiteConfig is the rotation suite's policy as a manager's Config.
func suiteConfig(store rotation.Store, clk *clocktesting.FakeClock, rec rotation.Recorder) rotation.Config {
	return rotation.Config{Store: store, TrustDomain: td, Clock: clk, Recorder: rec, Log: quiet,
		IntermediateLifetime: suite.IntermediateLifetime, RootLifetime: suite.RootLifetime, RootPropagation: suite.RootPropagation,
		MaxWorkloadTTL: suite.MaxWorkloadTTL, Backdate: suite.Backdate, Interval: suite.Interval}
}

// verifyMaterial checks material as a relying party: the issuing
// certificate chains to the bundle at now.
func verifyMaterial(t *testing.T, m *authority.Material, now time.Time) {
	t.Helper()
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	for _, r := range m.Roots {
		roots.AddCert(r)
	}
	for _, c := range m.Chain[1:] {
		inter.AddCert(c)
	}
	if _, err := m.Cert.Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: now,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("at %s: the CA in force does not verify: %v", now.Sub(t0), err)
	}
}

// TestTickFollowsTheDecision runs the serving manager's Tick on a fake
// clock through two root lifetimes of the rotation suite's policy over a
// real store: it takes exactly the steps the pure decision takes in the
// simulation (TestDecideOverTime), the material in force verifies at every
// tick, and every step is recorded.
func TestTickFollowsTheDecision(t *testing.T) {
	ctx := context.Background()
	clk := clocktesting.NewFakeClock(t0)
	rec := &recorder{}
	m, err := rotation.New(suiteConfig(rotation.DirStore{Dir: t.TempDir()}, clk, rec))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.Initial(ctx); err != nil {
		t.Fatal(err)
	}
	var got []step
	for d := time.Duration(0); d <= 160*time.Second; d += suite.Interval {
		clk.SetTime(t0.Add(d))
		a, err := m.Tick(ctx)
		if err != nil {
			t.Fatalf("at %s: %v: %v", d, a, err)
		}
		if a != rotation.Nothing {
			got = append(got, step{d, a})
		}
		mat, _, err := m.Material(ctx, clk.Now())
		if err != nil {
			t.Fatalf("at %s: %v", d, err)
		}
		verifyMaterial(t, mat, clk.Now())
		if left := mat.Cert.NotAfter.Sub(clk.Now().Add(suite.Interval)); left < suite.MaxWorkloadTTL+suite.Backdate {
			t.Fatalf("at %s: the intermediate in force has %s left before the next check", d, left)
		}
	}
	want := simulate(t, suite, 160*time.Second)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("manager's steps\n got %v\nwant %v", got, want)
	}
	st, err := m.ReadState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	var gens, roots int
	for _, s := range want {
		switch s.action {
		case rotation.PrepareIntermediate, rotation.PrepareRoot:
			gens++
		}
		if s.action == rotation.PrepareRoot {
			roots++
		}
	}
	if st.LastGeneration != gens+1 || len(st.Retiring) != roots || st.RetireAfter != suite.MaxWorkloadTTL || st.RootPropagation != suite.RootPropagation {
		t.Fatalf("state %+v; want %d generations, %d roots retiring, the policy's times recorded", st, gens+1, roots)
	}
	// Every step is recorded; an activation names the intermediate and
	// the root it chains to.
	pi, pr, a := "prepare intermediate", "prepare root", []string{"activate intermediate", "activate root"}
	var wantRec []string
	for _, s := range want {
		switch s.action {
		case rotation.PrepareIntermediate:
			wantRec = append(wantRec, pi)
		case rotation.PrepareRoot:
			wantRec = append(wantRec, pr, pi)
		case rotation.Activate:
			wantRec = append(wantRec, a...)
		}
	}
	if fmt.Sprint(rec.list()) != fmt.Sprint(wantRec) {
		t.Fatalf("recorded\n %v\nwant %v", rec.list(), wantRec)
	}
}

// TestOpenNeverCreatesACA checks the operator's constructor where no
// control plane serves: every read is ErrNoCA and nothing is written, not
// even the directory.
func TestOpenNeverCreatesACA(t *testing.T) {
	ctx := context.Background()
	dir := filepath.Join(t.TempDir(), "ca")
	m, err := rotation.Open(rotation.Config{Dir: dir, TrustDomain: td})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.ReadState(ctx); !errors.Is(err, rotation.ErrNoCA) {
		t.Errorf("ReadState: %v, want ErrNoCA", err)
	}
	if _, _, err := m.Certificates(ctx, time.Now()); !errors.Is(err, rotation.ErrNoCA) {
		t.Errorf("Certificates: %v, want ErrNoCA", err)
	}
	if err := m.Prepare(ctx, false); !errors.Is(err, rotation.ErrNoCA) {
		t.Errorf("Prepare: %v, want ErrNoCA", err)
	}
	if err := m.Activate(ctx, true); !errors.Is(err, rotation.ErrNoCA) {
		t.Errorf("Activate: %v, want ErrNoCA", err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Fatalf("the operator's manager created %s (%v)", dir, err)
	}
	// The serving manager creates the CA; the operator's then reads it.
	if _, err := rotation.New(rotation.Config{Dir: dir, TrustDomain: td}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("the serving manager did not create its directory: %v", err)
	}
}

// TestOpenHonoursTheServingPolicy checks that an operator's manager uses
// the root propagation and retirement times and the CA lifetimes the
// serving control plane recorded, not its own defaults, keeps them
// recorded, and does not run the policy.
func TestOpenHonoursTheServingPolicy(t *testing.T) {
	ctx := context.Background()
	clk := clocktesting.NewFakeClock(t0)
	store := rotation.DirStore{Dir: t.TempDir()}
	const interLife, rootLife = 30 * 24 * time.Hour, 5 * 365 * 24 * time.Hour
	serving, err := rotation.New(rotation.Config{Store: store, TrustDomain: td, Clock: clk,
		RootPropagation: 2 * time.Hour, MaxWorkloadTTL: 36 * time.Hour, IntermediateLifetime: interLife, RootLifetime: rootLife})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := serving.Initial(ctx); err != nil {
		t.Fatal(err)
	}
	op, err := rotation.Open(rotation.Config{Store: store, TrustDomain: td, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Prepare(ctx, true); err != nil {
		t.Fatal(err)
	}
	clk.Step(2*time.Hour - time.Second)
	if err := op.Activate(ctx, false); !errors.Is(err, rotation.ErrTooEarly) {
		t.Fatalf("activate before the recorded propagation: %v, want ErrTooEarly", err)
	}
	clk.Step(time.Second)
	if err := op.Activate(ctx, false); err != nil {
		t.Fatalf("activate after the recorded propagation (2h, not the default 24h): %v", err)
	}
	st, err := op.ReadState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Retiring) != 1 || !st.Retiring[0].Until.Equal(clk.Now().Add(36*time.Hour+time.Hour)) {
		t.Fatalf("retiring %+v; want the old root kept the recorded 36h (over the default 24h) plus an hour", st.Retiring)
	}
	if st.RootPropagation != 2*time.Hour || st.RetireAfter != 36*time.Hour || st.IntermediateLifetime != interLife || st.RootLifetime != rootLife {
		t.Fatalf("state %+v; the operator's manager must keep the serving policy recorded", st)
	}
	mat, _, err := op.Certificates(ctx, clk.Now())
	if err != nil {
		t.Fatal(err)
	}
	if !mat.Cert.NotAfter.Equal(t0.Add(interLife)) || !mat.Anchor.NotAfter.Equal(t0.Add(rootLife)) {
		t.Fatalf("the operator minted an intermediate to %s and a root to %s; want the recorded lifetimes, to %s and %s",
			mat.Cert.NotAfter, mat.Anchor.NotAfter, t0.Add(interLife), t0.Add(rootLife))
	}
	if _, err := op.Tick(ctx); !errors.Is(err, rotation.ErrNotServing) {
		t.Fatalf("Tick on the operator's manager: %v, want ErrNotServing", err)
	}
	if err := op.Run(ctx, func(*authority.Material) {}); !errors.Is(err, rotation.ErrNotServing) {
		t.Fatalf("Run on the operator's manager: %v, want ErrNotServing", err)
	}
}

// TestManualSteps checks the steps' own rules: one prepared CA at a time,
// nothing to activate, a root that has not propagated.
func TestManualSteps(t *testing.T) {
	ctx := context.Background()
	clk := clocktesting.NewFakeClock(t0)
	m, err := rotation.New(rotation.Config{Dir: t.TempDir(), TrustDomain: td, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Activate(ctx, false); !errors.Is(err, rotation.ErrNothingPrepared) {
		t.Fatalf("activate with nothing prepared: %v", err)
	}
	if err := m.Prepare(ctx, true); err != nil {
		t.Fatal(err)
	}
	if err := m.Prepare(ctx, false); !errors.Is(err, rotation.ErrAlreadyPrepared) {
		t.Fatalf("second prepare: %v", err)
	}
	mat, _, err := m.Material(ctx, clk.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(mat.Roots) != 2 {
		t.Fatalf("%d roots in the bundle after preparing a root; want the new one beside the old", len(mat.Roots))
	}
	if err := m.Activate(ctx, false); !errors.Is(err, rotation.ErrTooEarly) {
		t.Fatalf("activate an unpropagated root: %v", err)
	}
	if err := m.Activate(ctx, true); err != nil {
		t.Fatalf("forced activation: %v", err)
	}
	next, _, err := m.Material(ctx, clk.Now())
	if err != nil {
		t.Fatal(err)
	}
	if next.Anchor.Equal(mat.Anchor) || len(next.Roots) != 2 {
		t.Fatalf("after activation: anchor unchanged or %d roots; want the new anchor and the old root retiring", len(next.Roots))
	}
	verifyMaterial(t, next, clk.Now())
	// Once every certificate signed under the old root has expired, the
	// policy retires it from the bundle, and only then.
	st, err := m.ReadState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	clk.SetTime(st.Retiring[0].Until.Add(-time.Second))
	if a, err := m.Tick(ctx); err != nil || a != rotation.Nothing {
		t.Fatalf("tick before the retirement: %v, %v; want nothing", a, err)
	}
	clk.SetTime(st.Retiring[0].Until)
	if a, err := m.Tick(ctx); err != nil || a != rotation.Retire {
		t.Fatalf("tick at the retirement: %v, %v; want retire", a, err)
	}
	mat, st, err = m.Material(ctx, clk.Now())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.Retiring) != 0 || len(mat.Roots) != 1 || !mat.Roots[0].Equal(next.Anchor) {
		t.Fatalf("after retirement: %d retiring, %d roots; want the new root alone", len(st.Retiring), len(mat.Roots))
	}
}
