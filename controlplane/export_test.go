package controlplane

import (
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// This package's tests look inside the control plane; nothing else can.

// Authority is the CA material in force.
func (cp *ControlPlane) Authority() *authority.Authority { return cp.authority }

// Journal is the issuance journal.
func (cp *ControlPlane) Journal() *journal.Store { return cp.journal }
