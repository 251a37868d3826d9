package rotation_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/rotation"
)

// TestRootRotatesAfterMissedTicks runs the serving manager over a real
// DirStore through two root lifetimes of the rotation suite's policy, with
// the checks of one stretch around each root's due time missed (a leader
// failover, a journal that is down, a slow machine). Whatever the gap, the
// root rotates before it expires: a due root is never starved by preparing
// intermediates that the root's end cuts short, and the bundle holds the
// chain in force at every second, checks missed or not.
func TestRootRotatesAfterMissedTicks(t *testing.T) {
	s := time.Second
	// The suite's root is due rootMinLead = 20s + 5s + 4s + 5 Intervals =
	// 34s before its end.
	lead := suite.MaxWorkloadTTL + suite.Backdate + suite.RootPropagation + 5*suite.Interval
	type gap struct {
		from, length time.Duration // relative to the moment the root falls due
	}
	cases := map[string]gap{
		"no gap":            {0, 0},
		"3s at due":         {0, 3 * s},
		"6s at due":         {0, 6 * s},
		"20s at due":        {0, 20 * s},
		"intervals at due":  {0, 5 * suite.Interval},
		"intervals earlier": {-3 * suite.Interval, 5 * suite.Interval},
	}
	// The worst moment for a gap of several Intervals: every start from
	// a few Intervals before the root falls due to just after it is
	// prepared and the intermediate churn would begin.
	for from := -2 * suite.Interval; from <= 8*suite.Interval; from += suite.Interval {
		cases[fmt.Sprintf("5 intervals from due%+v", from)] = gap{from, 5 * suite.Interval}
	}
	for name, g := range cases {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			clk := clocktesting.NewFakeClock(t0)
			m, err := rotation.New(suiteConfig(rotation.DirStore{Dir: t.TempDir()}, clk, &recorder{}))
			if err != nil {
				t.Fatal(err)
			}
			mat, err := m.Initial(ctx)
			if err != nil {
				t.Fatal(err)
			}
			root := mat.Anchor
			var steps []step
			var rotations, churn int
			dueSeen, starved := false, false
			for d := time.Duration(0); d <= 2*suite.RootLifetime; d += suite.Interval {
				now := t0.Add(d)
				clk.SetTime(now)
				due := root.NotAfter.Add(-lead)
				if from := due.Add(g.from); g.length == 0 || now.Before(from) || !now.Before(from.Add(g.length)) {
					a, err := m.Tick(ctx)
					if err != nil {
						t.Fatalf("at %s: %v: %v; steps %v", d, a, err, steps)
					}
					if a != rotation.Nothing {
						steps = append(steps, step{d, a})
					}
					switch {
					case a == rotation.PrepareRoot:
						churn, dueSeen = 0, false
					case a == rotation.PrepareIntermediate && !now.Before(due):
						churn++
						dueSeen = true
					}
					// Once the root is due, at most one intermediate is
					// rotated ahead of it (one that would not last the
					// propagation); never a loop of them.
					if dueSeen && churn > 1 && !starved {
						starved = true
						t.Errorf("at %s: %d intermediates prepared since the root (ending %s) fell due at %s; steps %v",
							d, churn, root.NotAfter.Sub(t0), due.Sub(t0), steps)
					}
				}
				// The bundle holds the chain in force at every second, and
				// the root it ends at has not expired.
				mat, _, err := m.Material(ctx, now)
				if err != nil {
					t.Fatalf("at %s: the CA in force: %v; steps %v", d, err, steps)
				}
				verifyMaterial(t, mat, now)
				if !mat.Anchor.Equal(root) {
					if !now.Before(root.NotAfter) {
						t.Fatalf("at %s: root rotated after it expired at %s", d, root.NotAfter.Sub(t0))
					}
					rotations++
					root = mat.Anchor
				}
			}
			if rotations < 2 {
				t.Fatalf("%d root rotations in two root lifetimes; steps %v", rotations, steps)
			}
		})
	}
}
