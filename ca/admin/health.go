package admin

import (
	"context"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
)

// What `trustmesh check` reads. Both create and write nothing.

// OpenExisting opens, read-only, the journal of a data directory that
// trustmesh serve has set up; where there is none it returns ErrNoDataDir.
func (d DataDir) OpenExisting(ctx context.Context, o JournalOptions) (*journal.Store, spiffeid.TrustDomain, error) {
	return d.openExisting(ctx, o, true)
}

// RotationPlan reads the CA where serve keeps it and returns the
// certificates in force at now and what the rotation policy does next
// (rotation.Manager.Plan).
func RotationPlan(ctx context.Context, dir DataDir, o JournalOptions, now time.Time) (*RotationStatus, rotation.Plan, error) {
	store, td, err := dir.openExisting(ctx, o, true)
	if err != nil {
		return nil, rotation.Plan{}, err
	}
	store.Close()
	mgr, err := dir.rotationManager(td, nil, o)
	if err != nil {
		return nil, rotation.Plan{}, err
	}
	st, err := rotationStatus(ctx, mgr, now)
	if err != nil {
		return nil, rotation.Plan{}, fmt.Errorf("admin: the CA's rotation state: %w", err)
	}
	plan, err := mgr.Plan(ctx, now)
	if err != nil {
		return nil, rotation.Plan{}, fmt.Errorf("admin: the CA's rotation plan: %w", err)
	}
	return st, plan, nil
}
