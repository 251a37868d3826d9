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

// Validate checks the policy, collecting every error.
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
	return nil
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
	// PrepareRoot is when the next root is prepared; zero without a root.
	PrepareRoot time.Time
}

// Schedule returns when the policy prepares and activates the CA after a:
// the next intermediate at half and two thirds of the active one's life,
// the next root when a fifth of the active root's life is left.
func (p Policy) Schedule(a Active) Schedule {
	in := a.Intermediate
	life := in.NotAfter.Sub(in.NotBefore)
	s := Schedule{PrepareIntermediate: in.NotBefore.Add(life / 2), ActivateIntermediate: in.NotBefore.Add(2 * life / 3)}
	if !a.Root.NotAfter.IsZero() {
		s.PrepareRoot = a.Root.NotAfter.Add(-p.RootLifetime / 5)
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
	switch {
	case st.Next == 0 && !s.PrepareRoot.IsZero() && now.After(s.PrepareRoot):
		return PrepareRoot
	case st.Next == 0 && now.After(s.PrepareIntermediate):
		return PrepareIntermediate
	case st.Next != 0 && rootPropagated:
		return Activate
	case st.Next != 0 && !st.NextIsRoot && now.After(s.ActivateIntermediate):
		return Activate
	}
	return p.retirement(now, st)
}

func (p Policy) retirement(now time.Time, st State) Action {
	for _, r := range st.Retiring {
		if !now.Before(r.Until) {
			return Retire
		}
	}
	return Nothing
}
