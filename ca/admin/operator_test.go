package admin_test

import (
	"context"
	"encoding/json"
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

// TestRotationStatusSpellsDurations: the status of a prepared root says
// when it may be activated, and its JSON carries RFC 3339 times and Go
// duration strings, never nanoseconds.
func TestRotationStatusSpellsDurations(t *testing.T) {
	ctx := context.Background()
	e := newCAEnv(t, 0)
	st, err := admin.Rotate(ctx, e.dir, admin.JournalOptions{}, admin.RotateRequest{Step: "prepare", Root: true})
	if err != nil {
		t.Fatal(err)
	}
	if st.Next == 0 || !st.NextIsRoot || st.PreparedAt.IsZero() {
		t.Fatalf("status after prepare --root = %+v", st)
	}
	if st.RootPropagation <= 0 || !st.ActivatableAt.Equal(st.PreparedAt.Add(time.Duration(st.RootPropagation))) {
		t.Errorf("activatable at %s; want prepared at %s + %s", st.ActivatableAt, st.PreparedAt, time.Duration(st.RootPropagation))
	}
	b, err := json.Marshal(st)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"retire_after", "root_propagation"} {
		v, ok := m[k]
		if s, isString := v.(string); !ok || !isString {
			t.Errorf("%s = %v; want a Go duration string", k, v)
		} else if _, err := time.ParseDuration(s); err != nil {
			t.Errorf("%s = %q: %v", k, s, err)
		}
	}
	if _, err := time.Parse(time.RFC3339, m["prepared_at"].(string)); err != nil {
		t.Errorf("prepared_at = %v: %v", m["prepared_at"], err)
	}
	var back admin.RotationStatus
	if err := json.Unmarshal(b, &back); err != nil || back.RootPropagation != st.RootPropagation {
		t.Errorf("the status does not read back: %v, %v", back.RootPropagation, err)
	}
}
