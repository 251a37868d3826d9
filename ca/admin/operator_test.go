package admin_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// operatorOps are the operator commands, each pointed at a data directory.
var operatorOps = map[string]func(ctx context.Context, dir admin.DataDir) error{
	"ca token create": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.CreateJoinToken(ctx, dir, admin.JournalOptions{}, "spiffe://cluster.local/vm/db", time.Minute)
		return err
	},
	"ca revoke": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.Revoke(ctx, dir, admin.JournalOptions{}, "spiffe://cluster.local/vm/db")
		return err
	},
	"ca bundle": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.TrustBundle(ctx, dir, admin.JournalOptions{}, "")
		return err
	},
	"ca rotate --status": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.Rotate(ctx, dir, admin.JournalOptions{}, admin.RotateRequest{Step: "status"})
		return err
	},
	"ca rotate --prepare": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.Rotate(ctx, dir, admin.JournalOptions{}, admin.RotateRequest{Step: "prepare"})
		return err
	},
	"ca rotate --activate": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.Rotate(ctx, dir, admin.JournalOptions{}, admin.RotateRequest{Step: "activate"})
		return err
	},
	"audit log": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.AuditLog(ctx, dir, admin.JournalOptions{}, audit.Filter{})
		return err
	},
	"audit verify": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.AuditVerify(ctx, dir, admin.JournalOptions{}, "", nil)
		return err
	},
	"audit prove": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.AuditProve(ctx, dir, admin.JournalOptions{}, "5f1c")
		return err
	},
	"audit rotation": func(ctx context.Context, dir admin.DataDir) error {
		_, err := admin.AuditRotation(ctx, dir, admin.JournalOptions{}, time.Now(), time.Hour)
		return err
	},
}

// TestOperatorCommandsCreateNothing points every operator command at a data
// directory that does not exist and at an empty one: each fails with
// ErrNoDataDir, says to start serve there, and leaves nothing behind.
func TestOperatorCommandsCreateNothing(t *testing.T) {
	ctx := context.Background()
	for name, op := range operatorOps {
		t.Run(name, func(t *testing.T) {
			missing := filepath.Join(t.TempDir(), "missing")
			err := op(ctx, admin.DataDir(missing))
			if !errors.Is(err, admin.ErrNoDataDir) || !strings.Contains(err.Error(), "trustmesh serve --data-dir "+missing) {
				t.Errorf("on a missing directory: %v; want ErrNoDataDir naming `trustmesh serve --data-dir %s`", err, missing)
			}
			if _, err := os.Lstat(missing); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("the missing data directory was created (%v)", err)
			}

			empty := t.TempDir()
			if err := op(ctx, admin.DataDir(empty)); !errors.Is(err, admin.ErrNoDataDir) {
				t.Errorf("on an empty directory: %v; want ErrNoDataDir", err)
			}
			if ents, _ := os.ReadDir(empty); len(ents) != 0 {
				t.Errorf("the empty data directory now holds %v", ents)
			}
		})
	}
}

// TestOperatorCommandsCreateNoCheckpointKey: a journal whose checkpoint key
// is gone is not one an operator command may set up anew.
func TestOperatorCommandsCreateNoCheckpointKey(t *testing.T) {
	ctx := context.Background()
	e := newCAEnv(t, 0)
	key := filepath.Join(string(e.dir), "checkpoint-key.pem")
	if err := os.Remove(key); err != nil {
		t.Fatal(err)
	}
	_, err := admin.CreateJoinToken(ctx, e.dir, admin.JournalOptions{}, "spiffe://cluster.local/vm/db", time.Minute)
	if !errors.Is(err, admin.ErrNoDataDir) {
		t.Fatalf("token create without a checkpoint key: %v; want ErrNoDataDir", err)
	}
	if _, err := os.Stat(key); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("token create made a new checkpoint key (%v)", err)
	}
}

// TestRevokeUnknownWritesNothing: revoking an identity that never enrolled
// fails and appends nothing; revoking one with an unused token works.
func TestRevokeUnknownWritesNothing(t *testing.T) {
	ctx := context.Background()
	e := newCAEnv(t, 0)
	e.issue(spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"), false)
	size := func() int {
		t.Helper()
		rows, err := admin.AuditLog(ctx, e.dir, admin.JournalOptions{}, audit.Filter{})
		if err != nil {
			t.Fatal(err)
		}
		return len(rows)
	}
	before := size()
	_, err := admin.Revoke(ctx, e.dir, admin.JournalOptions{}, "spiffe://cluster.local/vm/never")
	if !errors.Is(err, journal.ErrNothingToRevoke) {
		t.Fatalf("revoke of a never-enrolled identity: %v; want ErrNothingToRevoke", err)
	}
	if after := size(); after != before {
		t.Fatalf("a refused revocation changed the journal from %d to %d entries", before, after)
	}

	id := "spiffe://cluster.local/vm/db"
	if _, err := admin.CreateJoinToken(ctx, e.dir, admin.JournalOptions{}, id, time.Minute); err != nil {
		t.Fatal(err)
	}
	rev, err := admin.Revoke(ctx, e.dir, admin.JournalOptions{}, id)
	if err != nil || rev.Tokens != 1 {
		t.Fatalf("revoke of an identity with an unused token = %+v, %v; want one token revoked", rev, err)
	}
	if after := size(); after != before+2 {
		t.Fatalf("journal has %d entries; want %d (a token and its revocation)", after, before+2)
	}
}
