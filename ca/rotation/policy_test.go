package rotation_test

import (
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/rotation"
)

// suite is a short policy: 60s intermediates, 10s leaves, a 5s backdate.
var suite = rotation.Policy{
	IntermediateLifetime: 60 * time.Second, RootLifetime: 150 * time.Second, RootPropagation: 4 * time.Second,
	MaxWorkloadTTL: 10 * time.Second, Backdate: 5 * time.Second, Interval: time.Second,
}

// defaults is the policy serve runs with no rotation flags.
var defaults = rotation.Config{}.Policy()

func TestPolicyValidate(t *testing.T) {
	for _, tc := range []struct {
		name   string
		p      rotation.Policy
		refuse []string // substrings of the error; nil: accepted
	}{
		{name: "defaults", p: defaults},
		{name: "rotation suite", p: suite},
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
// rules: the active intermediate is valid; a new root signs only after
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
	}
	return steps
}

// TestDecideOverTime steps through several intermediate and root lifetimes
// of a short policy and checks the exact sequence of steps.
func TestDecideOverTime(t *testing.T) {
	s := time.Second
	want := []step{
		// gen-1's intermediate (valid -5s..60s): after half its life
		// (27.5s) and two thirds (38.3s).
		{28 * s, rotation.PrepareIntermediate}, {39 * s, rotation.Activate},
		// gen-2 (23s..88s), gen-3 (51s..116s), gen-4 (79s..144s).
		{56 * s, rotation.PrepareIntermediate}, {67 * s, rotation.Activate},
		{84 * s, rotation.PrepareIntermediate}, {95 * s, rotation.Activate},
		{112 * s, rotation.PrepareIntermediate}, {123 * s, rotation.Activate},
		// The root (-5s..150s) is due after 120s, once gen-4 is active;
		// activated after its 4s propagation.
		{124 * s, rotation.PrepareRoot}, {128 * s, rotation.Activate},
		// gen-6, under the new root (119s..184s).
		{152 * s, rotation.PrepareIntermediate},
	}
	got := simulate(t, suite, 160*s)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("steps\n got %v\nwant %v", got, want)
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
