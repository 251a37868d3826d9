package rotation

import (
	"encoding/json"
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
	// Tainted are CA certificates marked compromised (taint.go), kept in
	// the bundle, marked, until nothing valid chains to them.
	Tainted []Tainted `json:"tainted,omitempty"`
}

// Retiring is a root kept in the bundle until Until.
type Retiring struct {
	CertPEM string    `json:"cert_pem"`
	Until   time.Time `json:"until"`
}

func parseState(b []byte) (State, error) {
	var st State
	if err := json.Unmarshal(b, &st); err != nil {
		return State{}, fmt.Errorf("rotation: %s: %w", stateFile, err)
	}
	if st.Active <= 0 {
		return State{}, fmt.Errorf("rotation: %s names no active generation", stateFile)
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
