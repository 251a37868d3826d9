package rotation

import (
	"errors"
	"fmt"
	"time"
)

// ErrPolicy is returned for a rotation policy that cannot keep its rules.
var ErrPolicy = errors.New("rotation: the rotation policy cannot be kept")

// Policy is when the CA's own certificates are prepared, activated and
// retired.
type Policy struct {
	// IntermediateLifetime and RootLifetime of new CA certificates, from
	// their creation (they are valid from Backdate earlier).
	IntermediateLifetime, RootLifetime time.Duration
	// RootPropagation is how long a prepared root stays in the bundle
	// before it is activated.
	RootPropagation time.Duration
	// MaxWorkloadTTL is the longest workload certificate the CA issues.
	MaxWorkloadTTL time.Duration
	// Backdate of new CA certificates.
	Backdate time.Duration
	// Interval between checks: a step the decision calls for is taken
	// within one Interval.
	Interval time.Duration
}

// Validate checks that the policy can keep the cut-short rule: the next CA
// is active at least MaxWorkloadTTL + Backdate before the active one
// expires, so that no workload certificate issued before the switch is cut
// short to the old intermediate's end. Every error is collected.
func (p Policy) Validate() error {
	var errs []error
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"intermediate lifetime", p.IntermediateLifetime}, {"root lifetime", p.RootLifetime},
		{"root propagation", p.RootPropagation}, {"maximum workload TTL", p.MaxWorkloadTTL},
		{"rotation interval", p.Interval},
	} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("the %s %s must be positive", d.name, d.v))
		}
	}
	if p.Backdate < 0 {
		errs = append(errs, fmt.Errorf("the backdate %s must not be negative", p.Backdate))
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %w", ErrPolicy, errors.Join(errs...))
	}
	margin := p.MaxWorkloadTTL + p.Backdate
	if need := margin + 2*p.Interval; p.IntermediateLifetime <= need {
		errs = append(errs, fmt.Errorf("the intermediate lifetime %s must exceed %s: the next intermediate must be active the maximum workload TTL %s plus the backdate %s before the current one expires, and preparing and activating it takes two rotation intervals of %s",
			p.IntermediateLifetime, need, p.MaxWorkloadTTL, p.Backdate, p.Interval))
	} else if need := margin + p.RootPropagation + 4*p.Interval; p.IntermediateLifetime <= need {
		errs = append(errs, fmt.Errorf("the intermediate lifetime %s must exceed %s: while a new root propagates (%s), the active intermediate must keep the maximum workload TTL %s plus the backdate %s to its end",
			p.IntermediateLifetime, need, p.RootPropagation, p.MaxWorkloadTTL, p.Backdate))
	}
	if lead := p.rootMinLead(); p.RootLifetime <= lead {
		errs = append(errs, fmt.Errorf("the root lifetime %s must exceed %s: a new root is prepared, propagated for %s and activated at least the maximum workload TTL %s plus the backdate %s before the active root expires",
			p.RootLifetime, lead, p.RootPropagation, p.MaxWorkloadTTL, p.Backdate))
	}
	if len(errs) > 0 {
		return fmt.Errorf("%w: %w", ErrPolicy, errors.Join(errs...))
	}
	return nil
}

// rootMinLead is how long before the active root's end the next root must
// be prepared: propagation, the cut-short margin, and intervals for the
// steps between (activating a prepared intermediate, rotating one that
// would not last the propagation, preparing, activating).
func (p Policy) rootMinLead() time.Duration {
	return p.MaxWorkloadTTL + p.Backdate + p.RootPropagation + 5*p.Interval
}

// Action is what the policy does next.
type Action int

// The actions.
const (
	Nothing Action = iota
	PrepareIntermediate
	PrepareRoot
	Activate
	Retire
)

func (a Action) String() string {
	switch a {
	case PrepareIntermediate:
		return "prepare-intermediate"
	case PrepareRoot:
		return "prepare-root"
	case Activate:
		return "activate"
	case Retire:
		return "retire"
	}
	return "nothing"
}

// Validity is a certificate's validity window.
type Validity struct{ NotBefore, NotAfter time.Time }

// Active is what the decision needs of the CA in force.
type Active struct {
	// Intermediate is the issuing certificate.
	Intermediate Validity
	// Root is the root the chain ends at; zero when there is none to
	// rotate.
	Root Validity
	// SelfManaged is set when trustmesh holds the root key and so mints the
	// next CA itself. Operator-supplied material is prepared by its
	// operator (Stage); the policy only activates it and retires roots.
	SelfManaged bool
}

// Schedule is when the policy acts on an active CA.
type Schedule struct {
	// PrepareIntermediate and ActivateIntermediate are when the next
	// intermediate is prepared and activated.
	PrepareIntermediate, ActivateIntermediate time.Time
	// IntermediateDeadline is the last instant at which the active
	// intermediate can issue a certificate of MaxWorkloadTTL (backdate
	// included) that it does not cut short.
	IntermediateDeadline time.Time
	// PrepareRoot is when the next root is prepared; zero without a root.
	PrepareRoot time.Time
}

// Schedule returns when the policy prepares and activates the CA after a.
//
// The intermediate is activated at two thirds of its life, or by the
// deadline less one Interval, whichever comes first, and prepared at half
// its life, or one Interval before it is activated. The root is prepared
// when a fifth of its life is left, or earlier by the same rule.
func (p Policy) Schedule(a Active) Schedule {
	in := a.Intermediate
	life := in.NotAfter.Sub(in.NotBefore)
	var s Schedule
	s.IntermediateDeadline = in.NotAfter.Add(-(p.MaxWorkloadTTL + p.Backdate))
	s.ActivateIntermediate = earliest(in.NotBefore.Add(2*life/3), s.IntermediateDeadline.Add(-p.Interval))
	s.PrepareIntermediate = earliest(in.NotBefore.Add(life/2), s.ActivateIntermediate.Add(-p.Interval))
	if !a.Root.NotAfter.IsZero() {
		s.PrepareRoot = earliest(a.Root.NotAfter.Add(-p.RootLifetime/5), a.Root.NotAfter.Add(-p.rootMinLead()))
	}
	return s
}

// Decide returns what the policy does at now with state st and the CA a in
// force. It is a pure function; the loop calls it once per Interval and
// takes the step it names.
func (p Policy) Decide(now time.Time, st State, a Active) Action {
	rootPropagated := st.NextIsRoot && !now.Before(st.PreparedAt.Add(p.RootPropagation))
	if !a.SelfManaged {
		if st.Next != 0 && (!st.NextIsRoot || rootPropagated) {
			return Activate
		}
		return p.retirement(now, st)
	}
	s := p.Schedule(a)
	rootDue := !s.PrepareRoot.IsZero() && !now.Before(s.PrepareRoot)
	switch {
	case st.Next != 0 && st.NextIsRoot:
		if rootPropagated {
			return Activate
		}
	case st.Next != 0:
		// A prepared intermediate is activated on schedule, or at once when
		// a root is due: activating it early costs nothing, and the root
		// cannot be prepared while it waits.
		if rootDue || !now.Before(s.ActivateIntermediate) {
			return Activate
		}
	case rootDue:
		// The active intermediate must last, by the cut-short rule, until
		// the new root is activated; if it would not, rotate it first, but
		// only while a fresh one still would: an intermediate is cut to
		// its root's end, so once checks come too late for that (a missed
		// stretch of them, a leader failover), rotating intermediates
		// keeps nothing and would starve the root until it expires. The
		// root is then prepared at once, and leaves issued before it is
		// activated may be cut short: a cut-short leaf, never an outage.
		if now.Add(p.RootPropagation+p.Interval).After(s.IntermediateDeadline) && p.freshIntermediateLasts(now, a.Root) {
			return PrepareIntermediate
		}
		return PrepareRoot
	case !now.Before(s.PrepareIntermediate):
		return PrepareIntermediate
	}
	return p.retirement(now, st)
}

// freshIntermediateLasts reports whether an intermediate prepared at now
// under root, activated one Interval later, keeps the cut-short rule until
// a root prepared one Interval after that has propagated and is activated,
// checks coming on time.
func (p Policy) freshIntermediateLasts(now time.Time, root Validity) bool {
	end := earliest(now.Add(p.IntermediateLifetime), root.NotAfter)
	deadline := end.Add(-(p.MaxWorkloadTTL + p.Backdate))
	return !now.Add(p.RootPropagation + 3*p.Interval).After(deadline)
}

func (p Policy) retirement(now time.Time, st State) Action {
	for _, r := range st.Retiring {
		if !now.Before(r.Until) {
			return Retire
		}
	}
	return Nothing
}

func earliest(a, b time.Time) time.Time {
	if b.Before(a) {
		return b
	}
	return a
}
