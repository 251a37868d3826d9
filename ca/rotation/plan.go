package rotation

import (
	"context"
	"fmt"
	"slices"
	"time"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// Plan is what the rotation policy does next with the CA in force, as the
// serving control plane's policy decides it (Decide): the step due now, if
// any, and since when, or else the next step and when it falls due.
type Plan struct {
	// Due is the step due at the time asked, Nothing when none is; DueSince
	// is when it fell due.
	Due      Action    `json:"due"`
	DueSince time.Time `json:"due_since,omitzero"`
	// Next is the next step after the time asked and At when it falls due;
	// Nothing when no step is scheduled.
	Next Action    `json:"next"`
	At   time.Time `json:"at,omitzero"`
}

// MarshalText names the action.
func (a Action) MarshalText() ([]byte, error) { return []byte(a.String()), nil }

// Plan reads the CA and its state and returns the policy's plan at now. An
// operator's manager plans with the retirement and propagation times the
// serving control plane recorded, and otherwise with its own Config's
// policy (the defaults, unless told otherwise).
func (m *Manager) Plan(ctx context.Context, now time.Time) (Plan, error) {
	mat, st, snap, err := m.material(ctx, now, authority.ReadCertificates)
	if err != nil {
		return Plan{}, err
	}
	a := Active{Intermediate: Validity{mat.Cert.NotBefore, mat.Cert.NotAfter}}
	if mat.Anchor != nil {
		a.Root = Validity{mat.Anchor.NotBefore, mat.Anchor.NotAfter}
	}
	if a.SelfManaged, err = authority.SelfManaged(genFiles(snap, st.Active)); err != nil {
		return Plan{}, fmt.Errorf("rotation: generation %d: %w", st.Active, err)
	}
	p := m.policy
	p.RootPropagation = m.rootPropagation(st)
	if !m.serving && st.RetireAfter > 0 {
		p.MaxWorkloadTTL = st.RetireAfter
	}
	return p.Plan(now, st, a), nil
}

// Plan returns the plan at now. It only asks Decide, at now and at the
// instants where its answer can change (the schedule's times, a prepared
// root's propagation, the retirements), so it can never disagree with the
// loop that takes the steps.
func (p Policy) Plan(now time.Time, st State, a Active) Plan {
	s := p.Schedule(a)
	times := []time.Time{s.PrepareIntermediate, s.ActivateIntermediate, s.PrepareRoot}
	if st.Next != 0 && st.NextIsRoot {
		times = append(times, st.PreparedAt.Add(p.RootPropagation))
	}
	for _, r := range st.Retiring {
		times = append(times, r.Until)
	}
	times = slices.DeleteFunc(times, time.Time.IsZero)
	slices.SortFunc(times, time.Time.Compare)

	var plan Plan
	if plan.Due = p.Decide(now, st, a); plan.Due != Nothing {
		plan.DueSince = now
		for _, t := range times {
			if !t.After(now) && p.Decide(t, st, a) != Nothing {
				plan.DueSince = t
				break
			}
		}
		return plan
	}
	for _, t := range times {
		if t.After(now) {
			if next := p.Decide(t, st, a); next != Nothing {
				plan.Next, plan.At = next, t
				break
			}
		}
	}
	return plan
}
