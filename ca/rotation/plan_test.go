package rotation_test

import (
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/rotation"
)

// TestPlan checks the step due now and since when, or the next step and
// when it falls due, against the schedule the policy keeps.
func TestPlan(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 0, 0, 0, 0, time.UTC)
	a := rotation.Active{SelfManaged: true,
		Intermediate: rotation.Validity{NotBefore: t0.Add(-5 * time.Second), NotAfter: t0.Add(55 * time.Second)},
		Root:         rotation.Validity{NotBefore: t0.Add(-5 * time.Second), NotAfter: t0.Add(105 * time.Second)}}
	s := suite.Schedule(a)
	prepared := rotation.State{Active: 1, Next: 2, LastGeneration: 2, PreparedAt: s.PrepareIntermediate}
	rootStaged := rotation.State{Active: 1, Next: 2, LastGeneration: 2, NextIsRoot: true, PreparedAt: t0}
	for _, tc := range []struct {
		name string
		now  time.Time
		st   rotation.State
		want rotation.Plan
	}{
		{"fresh", t0, rotation.State{Active: 1},
			rotation.Plan{Next: rotation.PrepareIntermediate, At: s.PrepareIntermediate}},
		{"intermediate overdue", s.PrepareIntermediate.Add(2 * time.Second), rotation.State{Active: 1},
			rotation.Plan{Due: rotation.PrepareIntermediate, DueSince: s.PrepareIntermediate}},
		{"intermediate prepared", s.PrepareIntermediate, prepared,
			rotation.Plan{Next: rotation.Activate, At: s.ActivateIntermediate}},
		{"root propagating", t0.Add(time.Second), rootStaged,
			rotation.Plan{Next: rotation.Activate, At: t0.Add(suite.RootPropagation)}},
		{"root propagated", t0.Add(suite.RootPropagation + time.Second), rootStaged,
			rotation.Plan{Due: rotation.Activate, DueSince: t0.Add(suite.RootPropagation)}},
	} {
		if got := suite.Plan(tc.now, tc.st, a); got != tc.want {
			t.Errorf("%s: %+v, want %+v", tc.name, got, tc.want)
		}
	}
}
