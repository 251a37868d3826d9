package rotation

import (
	"encoding/json"
	"errors"
	"fmt"
	"time"
)

// stateFile names the state in a Snapshot.
const stateFile = "rotation.json"

// State is the rotation state on disk.
type State struct {
	Active int `json:"active"`
	// Next is the prepared generation, 0 when none.
	Next           int        `json:"next,omitempty"`
	NextIsRoot     bool       `json:"next_is_root,omitempty"`
	PreparedAt     time.Time  `json:"prepared_at,omitzero"`
	ActivatedAt    time.Time  `json:"activated_at,omitzero"`
	Retiring       []Retiring `json:"retiring,omitempty"`
	LastGeneration int        `json:"last_generation"`
	// RetireAfter is how long an old root stays in the bundle after a new
	// one is activated: the longest workload certificate the serving
	// control plane issues, recorded so that an operator's manager honours
	// it too.
	RetireAfter time.Duration `json:"retire_after,omitempty"`
	// RootPropagation is how long a prepared root must sit in the bundle
	// before it may be activated, as the serving control plane recorded it.
	RootPropagation time.Duration `json:"root_propagation,omitempty"`
	// IntermediateLifetime and RootLifetime are the lifetimes the serving
	// control plane gives new CA certificates, recorded so that a
	// certificate an operator's manager mints (ca rotate --prepare,
	// --taint) lives as long as one serve mints on its schedule.
	IntermediateLifetime time.Duration `json:"intermediate_lifetime,omitempty"`
	RootLifetime         time.Duration `json:"root_lifetime,omitempty"`
	// Tainted are CA certificates marked compromised (taint.go), kept in
	// the bundle, marked, until nothing valid chains to them.
	Tainted []Tainted `json:"tainted,omitempty"`
}

// Retiring is a root kept in the bundle until Until.
type Retiring struct {
	CertPEM string    `json:"cert_pem"`
	Until   time.Time `json:"until"`
}

// ErrCorruptState is returned when the rotation state cannot be read as
// written: it is empty, truncated or not the state. The CA then refuses to
// start rather than create a new CA over the one whose state it lost.
var ErrCorruptState = errors.New("rotation: the CA's rotation state is corrupt")

// restoreHint ends every ErrCorruptState message: what the operator does.
const restoreHint = "restore the CA directory from a backup; trustmesh does not create a new CA over an existing one"

func parseState(b []byte) (State, error) {
	if len(b) == 0 {
		return State{}, fmt.Errorf("%w: %s is empty; %s", ErrCorruptState, stateFile, restoreHint)
	}
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return State{}, fmt.Errorf("%w: %s is not a rotation state (%d bytes, truncated or overwritten: %w); %s",
			ErrCorruptState, stateFile, len(b), err, restoreHint)
	}
	if st.Active <= 0 || st.Next < 0 {
		return State{}, fmt.Errorf("%w: %s names no valid active generation (active %d, next %d); %s",
			ErrCorruptState, stateFile, st.Active, st.Next, restoreHint)
	}
	return st, nil
}

func encodeState(st State) ([]byte, error) {
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("rotation: %w", err)
	}
	return b, nil
}
