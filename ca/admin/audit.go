package admin

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/serial"
)

// AuditLog returns the journal's history.
func AuditLog(ctx context.Context, dir DataDir, o JournalOptions, f audit.Filter) ([]audit.Row, error) {
	store, _, err := dir.openExisting(ctx, o, true)
	if err != nil {
		return nil, err
	}
	defer store.Close()
	return audit.Log(ctx, store, f)
}

// CheckpointKey returns the verifier key: vkey when given, else the one the
// data directory publishes. An auditor who does not trust the data directory
// passes the key they were given out of band.
func CheckpointKey(dir DataDir, vkey string) (string, error) {
	if vkey != "" {
		return vkey, nil
	}
	b, err := os.ReadFile(dir.CheckpointPubPath())
	if err != nil {
		return "", fmt.Errorf("admin: checkpoint key: %w (pass --key)", err)
	}
	return strings.TrimSpace(string(b)), nil
}

// AuditVerify recomputes the journal and checks it against its signed
// checkpoints and the witness checkpoints in witnessFiles.
func AuditVerify(ctx context.Context, dir DataDir, o JournalOptions, vkey string, witnessFiles []string) (*journal.Report, error) {
	store, _, err := dir.openExisting(ctx, o, true)
	if err != nil {
		return nil, err
	}
	defer store.Close()
	key, err := CheckpointKey(dir, vkey)
	if err != nil {
		return nil, err
	}
	var witness [][]byte
	for _, f := range witnessFiles {
		b, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("admin: witness checkpoint: %w", err)
		}
		witness = append(witness, b)
	}
	return journal.Verify(ctx, store, key, witness)
}

// AuditProve returns an inclusion proof of the certificate with serial, in
// any form serial.Parse reads (the journal's, or openssl's "serial=0A1B…").
func AuditProve(ctx context.Context, dir DataDir, o JournalOptions, sn string) (*journal.InclusionProof, error) {
	norm, err := serial.Normalize(sn)
	if err != nil {
		return nil, fmt.Errorf("admin: %w", err)
	}
	store, _, err := dir.openExisting(ctx, o, true)
	if err != nil {
		return nil, err
	}
	defer store.Close()
	return journal.Prove(ctx, store, norm)
}

// AuditRotation builds the rotation report at time at.
func AuditRotation(ctx context.Context, dir DataDir, o JournalOptions, at time.Time, horizon time.Duration) (*audit.RotationReport, error) {
	store, td, err := dir.openExisting(ctx, o, true)
	if err != nil {
		return nil, err
	}
	defer store.Close()
	// The CA's own certificates are half of the audit: a report without
	// them would pass a pipeline that never looked.
	mgr, err := dir.rotationManager(td, nil, o)
	if err != nil {
		return nil, err
	}
	st, err := rotationStatus(ctx, mgr, at)
	if err != nil {
		return nil, fmt.Errorf("admin: the CA's rotation state: %w", err)
	}
	return audit.Rotation(ctx, store, st.CA, at, horizon)
}

// AuditNodes returns which node holds which identities at time at: the
// certificates valid then that node agents obtained by delegated issuance,
// grouped by node. It reads the journal alone.
func AuditNodes(ctx context.Context, dir DataDir, o JournalOptions, at time.Time) ([]audit.NodeHolding, error) {
	store, _, err := dir.openExisting(ctx, o, true)
	if err != nil {
		return nil, err
	}
	defer store.Close()
	return audit.Nodes(ctx, store, at)
}
