package rotation_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/rotation"
)

// suite is the rotation suite's policy: 60s intermediates, 20s leaves, a
// 5s backdate.
var suite = rotation.Policy{
	IntermediateLifetime: 60 * time.Second, RootLifetime: 110 * time.Second, RootPropagation: 4 * time.Second,
	MaxWorkloadTTL: 20 * time.Second, Backdate: 5 * time.Second, Interval: time.Second,
}

// defaults is the policy serve runs with no rotation flags.
var defaults = rotation.Config{}.Policy()

func TestPolicyValidate(t *testing.T) {
	with := func(p rotation.Policy, f func(*rotation.Policy)) rotation.Policy { f(&p); return p }
	for _, tc := range []struct {
		name   string
		p      rotation.Policy
		refuse []string // substrings of the error; nil: accepted
	}{
		{name: "defaults", p: defaults},
		{name: "rotation suite", p: suite},
		{name: "a week of intermediates, 24h leaves", p: with(defaults, func(p *rotation.Policy) { p.IntermediateLifetime = 7 * 24 * time.Hour })},
		// IL must exceed MaxWorkloadTTL + Backdate + 2 intervals = 27s, and
		// for a root rotation RootPropagation + 2 more intervals.
		{name: "intermediate just long enough", p: with(suite, func(p *rotation.Policy) {
			p.IntermediateLifetime, p.RootPropagation = 29*time.Second+2*time.Millisecond, time.Millisecond
		})},
		{name: "intermediate exactly the margin", p: with(suite, func(p *rotation.Policy) {
			p.IntermediateLifetime, p.RootPropagation = 27*time.Second, time.Millisecond
		}), refuse: []string{"intermediate lifetime 27s must exceed 27s"}},
		{name: "intermediate shorter than a leaf", p: with(suite, func(p *rotation.Policy) { p.IntermediateLifetime = 15 * time.Second }),
			refuse: []string{"intermediate lifetime 15s must exceed 27s"}},
		{name: "24h leaves under 24h intermediates", p: with(defaults, func(p *rotation.Policy) { p.IntermediateLifetime = 24 * time.Hour }),
			refuse: []string{"intermediate lifetime 24h0m0s must exceed 24h7m0s"}},
		// ... and, for a root rotation, RootPropagation + 2 more intervals.
		{name: "intermediate outlived by root propagation", p: with(suite, func(p *rotation.Policy) { p.RootPropagation = 40 * time.Second }),
			refuse: []string{"intermediate lifetime 1m0s must exceed 1m9s", "root lifetime 1m50s must exceed 1m10s"}[:1]},
		{name: "root too short to propagate", p: with(suite, func(p *rotation.Policy) { p.RootLifetime = 34 * time.Second }),
			refuse: []string{"root lifetime 34s must exceed 34s"}},
		{name: "every error at once", p: rotation.Policy{Backdate: -time.Second},
			refuse: []string{"intermediate lifetime 0s must be positive", "root lifetime 0s must be positive", "root propagation 0s must be positive",
				"maximum workload TTL 0s must be positive", "rotation interval 0s must be positive", "backdate -1s must not be negative"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.p.Validate()
			if tc.refuse == nil {
				if err != nil {
					t.Fatalf("refused: %v", err)
				}
				return
			}
			if !errors.Is(err, rotation.ErrPolicy) {
				t.Fatalf("error %v, want ErrPolicy", err)
			}
			for _, want := range tc.refuse {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not say %q", err, want)
				}
			}
		})
	}
}

// TestConfigValidate checks that the configuration New validates carries
// the policy's rule, with defaults filled in, and that New refuses it.
func TestConfigValidate(t *testing.T) {
	cfg := rotation.Config{Dir: t.TempDir(), TrustDomain: td, IntermediateLifetime: 30 * time.Second, MaxWorkloadTTL: 20 * time.Second,
		Backdate: 5 * time.Second, Interval: time.Second, RootPropagation: time.Second, RootLifetime: time.Hour}
	if err := cfg.Validate(); !errors.Is(err, rotation.ErrPolicy) {
		t.Fatalf("Validate: %v, want ErrPolicy", err)
	}
	if _, err := rotation.New(cfg); !errors.Is(err, rotation.ErrPolicy) {
		t.Fatalf("New: %v, want ErrPolicy", err)
	}
	cfg.IntermediateLifetime = time.Minute
	if err := cfg.Validate(); err != nil {
		t.Fatal(err)
	}
	if err := (rotation.Config{TrustDomain: td}).Validate(); err == nil {
		t.Fatal("a config with neither store nor directory validated")
	}
}

// TestScheduleCutShortRule checks when the next intermediate is prepared
// and activated: at half and two thirds of the active one's life, unless
// the cut-short rule (activate MaxWorkloadTTL + Backdate before the end,
// less one interval for the check) asks for earlier.
func TestScheduleCutShortRule(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	for _, tc := range []struct {
		name                        string
		p                           rotation.Policy
		notBefore, notAfter         time.Duration
		prepare, activate, deadline time.Duration
	}{
		// 65s of validity: two thirds is 43.3s in, but a 20s leaf + 5s
		// backdate must fit before the end: deadline 40s, activate 39s.
		{name: "rotation suite", p: suite, notBefore: -5 * time.Second, notAfter: 60 * time.Second,
			prepare: 27500 * time.Millisecond, activate: 34 * time.Second, deadline: 35 * time.Second},
		// A year: two thirds and a half of life, as always.
		{name: "defaults", p: defaults, notBefore: -5 * time.Minute, notAfter: 365 * 24 * time.Hour,
			prepare: (365*24*time.Hour+5*time.Minute)/2 - 5*time.Minute, activate: 2*(365*24*time.Hour+5*time.Minute)/3 - 5*time.Minute,
			deadline: 365*24*time.Hour - 24*time.Hour - 5*time.Minute},
		// Clamped to its root's end: the rule brings both forward.
		{name: "clamped intermediate", p: suite, notBefore: -5 * time.Second, notAfter: 40 * time.Second,
			prepare: 13 * time.Second, activate: 14 * time.Second, deadline: 15 * time.Second},
		// Where two thirds already keeps the rule, it is kept.
		{name: "long intermediate, short leaves", p: func() rotation.Policy { p := suite; p.MaxWorkloadTTL = 5 * time.Second; return p }(),
			notBefore: -5 * time.Second, notAfter: 60 * time.Second,
			prepare: 27500 * time.Millisecond, activate: 38333333333 * time.Nanosecond, deadline: 50 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := tc.p.Schedule(rotation.Active{Intermediate: rotation.Validity{NotBefore: at(tc.notBefore), NotAfter: at(tc.notAfter)}})
			if !s.PrepareIntermediate.Equal(at(tc.prepare)) || !s.ActivateIntermediate.Equal(at(tc.activate)) || !s.IntermediateDeadline.Equal(at(tc.deadline)) {
				t.Fatalf("prepare %s, activate %s, deadline %s after t0; want %s, %s, %s",
					s.PrepareIntermediate.Sub(t0), s.ActivateIntermediate.Sub(t0), s.IntermediateDeadline.Sub(t0), tc.prepare, tc.activate, tc.deadline)
			}
			// The rule itself: activated by the last check before the
			// deadline, a full leaf plus the backdate fits under the old
			// intermediate.
			if got := at(tc.notAfter).Sub(s.ActivateIntermediate.Add(tc.p.Interval)); got < tc.p.MaxWorkloadTTL+tc.p.Backdate {
				t.Fatalf("activated %s before the end, want at least %s", got, tc.p.MaxWorkloadTTL+tc.p.Backdate)
			}
		})
	}
}

// world is a model of the CA's certificates for simulating the policy: it
// applies each decided step as the Manager does.
type world struct {
	p          rotation.Policy
	st         rotation.State
	root       rotation.Validity
	inter      rotation.Validity
	nextRoot   rotation.Validity
	nextInter  rotation.Validity
	retiring   []rotation.Validity
	lastActive time.Time
}

func newWorld(p rotation.Policy, now time.Time) *world {
	w := &world{p: p, st: rotation.State{Active: 1, LastGeneration: 1}}
	w.root = rotation.Validity{NotBefore: now.Add(-p.Backdate), NotAfter: now.Add(p.RootLifetime)}
	w.inter = w.mint(now, w.root)
	return w
}

func (w *world) mint(now time.Time, parent rotation.Validity) rotation.Validity {
	end := now.Add(w.p.IntermediateLifetime)
	if end.After(parent.NotAfter) {
		end = parent.NotAfter
	}
	return rotation.Validity{NotBefore: now.Add(-w.p.Backdate), NotAfter: end}
}

func (w *world) apply(now time.Time, a rotation.Action) {
	switch a {
	case rotation.PrepareIntermediate:
		w.nextRoot, w.nextInter = w.root, w.mint(now, w.root)
		w.st.Next, w.st.NextIsRoot, w.st.PreparedAt = w.st.LastGeneration+1, false, now
		w.st.LastGeneration++
	case rotation.PrepareRoot:
		w.nextRoot = rotation.Validity{NotBefore: now.Add(-w.p.Backdate), NotAfter: now.Add(w.p.RootLifetime)}
		w.nextInter = w.mint(now, w.nextRoot)
		w.st.Next, w.st.NextIsRoot, w.st.PreparedAt = w.st.LastGeneration+1, true, now
		w.st.LastGeneration++
	case rotation.Activate:
		if w.st.NextIsRoot {
			w.st.Retiring = append(w.st.Retiring, rotation.Retiring{Until: now.Add(w.p.MaxWorkloadTTL + time.Hour)})
		}
		w.root, w.inter = w.nextRoot, w.nextInter
		w.st.Active, w.st.Next, w.st.NextIsRoot, w.st.PreparedAt = w.st.Next, 0, false, time.Time{}
	case rotation.Retire:
		kept := w.st.Retiring[:0:0]
		for _, r := range w.st.Retiring {
			if now.Before(r.Until) {
				kept = append(kept, r)
			}
		}
		w.st.Retiring = kept
	}
}

type step struct {
	at     time.Duration
	action rotation.Action
}

func (s step) String() string { return fmt.Sprintf("%s@%s", s.action, s.at) }

// simulate steps a clock through span by the policy's interval, as Run
// does, deciding and applying at each tick. At every tick it checks the
// rules: the active intermediate is valid and can issue a full leaf
// (plus backdate) without cutting it short; a new root signs only after
// RootPropagation in the bundle.
func simulate(t *testing.T, p rotation.Policy, span time.Duration) []step {
	t.Helper()
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	w := newWorld(p, t0)
	var steps []step
	for d := time.Duration(0); d <= span; d += p.Interval {
		now := t0.Add(d)
		a := p.Decide(now, w.st, rotation.Active{Intermediate: w.inter, Root: w.root, SelfManaged: true})
		if a == rotation.Activate && w.st.NextIsRoot && now.Sub(w.st.PreparedAt) < p.RootPropagation {
			t.Fatalf("at %s: activated a root %s after preparing it", d, now.Sub(w.st.PreparedAt))
		}
		w.apply(now, a)
		if a != rotation.Nothing {
			steps = append(steps, step{d, a})
		}
		if now.Before(w.inter.NotBefore) || !now.Before(w.inter.NotAfter) {
			t.Fatalf("at %s: the active intermediate (%s to %s) is not valid; steps %v", d, w.inter.NotBefore.Sub(t0), w.inter.NotAfter.Sub(t0), steps)
		}
		// Until the next check, a leaf issued now must fit.
		if left := w.inter.NotAfter.Sub(now.Add(p.Interval)); left < p.MaxWorkloadTTL+p.Backdate {
			t.Fatalf("at %s: a leaf issued before the next check is cut short: %s left, want %s; steps %v", d, left, p.MaxWorkloadTTL+p.Backdate, steps)
		}
	}
	return steps
}

// TestDecideOverTime steps through several intermediate and root lifetimes
// of the rotation suite's policy and checks the exact sequence of steps.
func TestDecideOverTime(t *testing.T) {
	s := time.Second
	want := []step{
		// gen-1's intermediate (valid -5s..60s): prepare at half life,
		// activate by the cut-short rule at 34s, not at two thirds (38.3s).
		{28 * s, rotation.PrepareIntermediate}, {34 * s, rotation.Activate},
		// gen-2 (23s..88s): 55.5s and 62s.
		{56 * s, rotation.PrepareIntermediate}, {62 * s, rotation.Activate},
		// gen-3 is clamped to the root's end (51s..110s). The root is due
		// at 110s-34s = 76s, and gen-3 lasts past its propagation.
		{76 * s, rotation.PrepareRoot}, {80 * s, rotation.Activate},
		// gen-4, under the new root (71s..136s, root 71s..186s).
		{104 * s, rotation.PrepareIntermediate}, {110 * s, rotation.Activate},
		{132 * s, rotation.PrepareIntermediate}, {138 * s, rotation.Activate},
		// The second root is due at 186s-34s = 152s; gen-6 (127s..186s) lasts.
		{152 * s, rotation.PrepareRoot}, {156 * s, rotation.Activate},
	}
	got := simulate(t, suite, 160*s)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("steps\n got %v\nwant %v", got, want)
	}
}

// TestDecideKeepsTheRules runs the policy over many lifetimes for a table
// of accepted policies, where simulate checks the rules at every tick.
func TestDecideKeepsTheRules(t *testing.T) {
	for name, p := range map[string]rotation.Policy{
		"rotation suite": suite,
		"tight intermediates": {IntermediateLifetime: 34 * time.Second, RootLifetime: 100 * time.Second, RootPropagation: 4 * time.Second,
			MaxWorkloadTTL: 20 * time.Second, Backdate: 5 * time.Second, Interval: time.Second},
		"root barely longer than its lead": {IntermediateLifetime: 60 * time.Second, RootLifetime: 40 * time.Second, RootPropagation: 4 * time.Second,
			MaxWorkloadTTL: 20 * time.Second, Backdate: 5 * time.Second, Interval: time.Second},
		"slow propagation": {IntermediateLifetime: 10 * time.Minute, RootLifetime: 30 * time.Minute, RootPropagation: 3 * time.Minute,
			MaxWorkloadTTL: 2 * time.Minute, Backdate: 10 * time.Second, Interval: 10 * time.Second},
		"hourly leaves, daily intermediates": {IntermediateLifetime: 24 * time.Hour, RootLifetime: 10 * 24 * time.Hour, RootPropagation: 6 * time.Hour,
			MaxWorkloadTTL: time.Hour, Backdate: 5 * time.Minute, Interval: time.Minute},
	} {
		t.Run(name, func(t *testing.T) {
			if err := p.Validate(); err != nil {
				t.Fatal(err)
			}
			steps := simulate(t, p, 5*p.RootLifetime)
			var roots, activations int
			for _, s := range steps {
				switch s.action {
				case rotation.PrepareRoot:
					roots++
				case rotation.Activate:
					activations++
				}
			}
			if roots < 4 || activations < 8 {
				t.Fatalf("%d root rotations and %d activations over five root lifetimes: %v", roots, activations, steps)
			}
		})
	}
}

// TestDecideBeforeTheRule shows what the rule prevents: with activation at
// two thirds of life alone, as before, the rotation suite's policy cuts
// leaves short.
func TestDecideBeforeTheRule(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	in := rotation.Validity{NotBefore: t0.Add(-5 * time.Second), NotAfter: t0.Add(60 * time.Second)}
	twoThirds := in.NotBefore.Add(2 * in.NotAfter.Sub(in.NotBefore) / 3)
	if left := in.NotAfter.Sub(twoThirds); left >= suite.MaxWorkloadTTL+suite.Backdate {
		t.Fatalf("two thirds leaves %s; the rule would not matter here", left)
	}
	st := rotation.State{Active: 1, Next: 2, LastGeneration: 2, PreparedAt: t0.Add(28 * time.Second)}
	at := twoThirds.Add(-time.Second)
	if a := suite.Decide(at, st, rotation.Active{Intermediate: in, SelfManaged: true}); a != rotation.Activate {
		t.Fatalf("%s before two thirds: %v, want activate (the rule)", twoThirds.Sub(at), a)
	}
}

// TestDecideOperatorSupplied checks that the policy never mints for
// operator-supplied material: it activates what the operator staged (a new
// root once propagated) and retires roots.
func TestDecideOperatorSupplied(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	a := rotation.Active{Intermediate: rotation.Validity{NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Minute)},
		Root: rotation.Validity{NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Minute)}}
	for _, tc := range []struct {
		name string
		st   rotation.State
		now  time.Time
		want rotation.Action
	}{
		{"expiring, nothing staged", rotation.State{Active: 1}, t0, rotation.Nothing},
		{"intermediate staged", rotation.State{Active: 1, Next: 2, PreparedAt: t0}, t0, rotation.Activate},
		{"root staged, propagating", rotation.State{Active: 1, Next: 2, NextIsRoot: true, PreparedAt: t0}, t0.Add(defaults.RootPropagation - time.Second), rotation.Nothing},
		{"root staged, propagated", rotation.State{Active: 1, Next: 2, NextIsRoot: true, PreparedAt: t0}, t0.Add(defaults.RootPropagation), rotation.Activate},
		{"root to retire", rotation.State{Active: 1, Retiring: []rotation.Retiring{{Until: t0}}}, t0, rotation.Retire},
		{"root not yet retired", rotation.State{Active: 1, Retiring: []rotation.Retiring{{Until: t0.Add(time.Second)}}}, t0, rotation.Nothing},
	} {
		if got := defaults.Decide(tc.now, tc.st, a); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestDecideDueRootNotStarved checks the decision once the root is due and
// the active intermediate would not last the root's propagation: it is
// rotated first only while a fresh intermediate, cut to the root's end,
// would last; later (checks missed) the root is prepared at once, since
// rotating intermediates would keep nothing and starve the root.
func TestDecideDueRootNotStarved(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	root := rotation.Validity{NotBefore: t0.Add(-5 * time.Second), NotAfter: t0.Add(110 * time.Second)}
	st := rotation.State{Active: 3, LastGeneration: 3}
	for _, tc := range []struct {
		name  string
		now   time.Duration
		inter rotation.Validity
		want  rotation.Action
	}{
		// Due at 76s; an intermediate ending at 100s (deadline 75s) would
		// not last; a fresh one, ending at 110s (deadline 85s), would: 76s
		// + 4s propagation + 3 Intervals = 83s.
		{"on time, old intermediate", 76, rotation.Validity{NotBefore: t0.Add(35 * time.Second), NotAfter: t0.Add(100 * time.Second)}, rotation.PrepareIntermediate},
		// 82s + 7s is past any fresh intermediate's deadline: prepare the root.
		{"late, old intermediate", 82, rotation.Validity{NotBefore: t0.Add(35 * time.Second), NotAfter: t0.Add(100 * time.Second)}, rotation.PrepareRoot},
		// The reviewer's loop: the intermediate is already cut to the
		// root's end (deadline 85s) and 82s + 5s is past it.
		{"late, cut to the root's end", 82, rotation.Validity{NotBefore: t0.Add(76 * time.Second), NotAfter: root.NotAfter}, rotation.PrepareRoot},
		{"on time, cut to the root's end", 76, rotation.Validity{NotBefore: t0.Add(51 * time.Second), NotAfter: root.NotAfter}, rotation.PrepareRoot},
	} {
		now := t0.Add(tc.now * time.Second)
		if got := suite.Decide(now, st, rotation.Active{Intermediate: tc.inter, Root: root, SelfManaged: true}); got != tc.want {
			t.Errorf("%s: %v, want %v", tc.name, got, tc.want)
		}
	}
}
