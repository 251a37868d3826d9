package journal

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"errors"
	"net/url"
	"os"
	"testing"
	"time"
)

// TestAppendLockOfACutOffReplicaIsReleased has one replica's session take
// the append lock and then fall silent, as a replica cut off from the
// database mid-commit looks to PostgreSQL: the session stays open, idle in
// its transaction. The other replica's append must still go through, once
// PostgreSQL ends that session (IdleInTransactionTimeout), well before its
// own commit gives up.
func TestAppendLockOfACutOffReplicaIsReleased(t *testing.T) {
	admin := os.Getenv("TRUSTMESH_TEST_POSTGRES_DSN")
	if admin == "" {
		if os.Getenv("CI") != "" {
			t.Fatal("TRUSTMESH_TEST_POSTGRES_DSN is not set: make test starts PostgreSQL and sets it")
		}
		t.Skip("TRUSTMESH_TEST_POSTGRES_DSN is not set (make test sets it)")
	}
	ctx := context.Background()
	dsn := freshDatabase(t, admin)
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	signer, vkey, err := NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	open := func() *Store {
		s, err := Open(ctx, Config{DSN: dsn, Signer: signer, VerifierKey: vkey})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	a, b := open(), open()
	if _, err := a.RecordIssuance(ctx, Issuance{Time: time.Now(), Serial: "01", SPIFFEID: "spiffe://td/a"}, nil); err != nil {
		t.Fatal(err)
	}

	// Replica a's session takes the lock, as its committer does, and says
	// nothing more.
	conn, err := a.db.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, `BEGIN`); err != nil {
		t.Fatal(err)
	}
	if _, err := conn.ExecContext(ctx, postgresAppendLock); err != nil {
		t.Fatal(err)
	}

	began := time.Now()
	if _, err := b.RecordIssuance(ctx, Issuance{Time: time.Now(), Serial: "02", SPIFFEID: "spiffe://td/b"}, nil); err != nil {
		t.Fatalf("the other replica's append after %s: %v", time.Since(began).Round(time.Millisecond), err)
	}
	waited := time.Since(began)
	if waited > IdleInTransactionTimeout+5*time.Second {
		t.Fatalf("the other replica waited %s for the lock; want about %s", waited, IdleInTransactionTimeout)
	}
	// The silent session was ended, not merely skipped.
	if _, err := conn.ExecContext(ctx, `SELECT 1`); err == nil {
		t.Fatal("the silent session still holds its transaction")
	}
	// And a, whose pool lost that session, appends again.
	if _, err := a.RecordIssuance(ctx, Issuance{Time: time.Now(), Serial: "03", SPIFFEID: "spiffe://td/a"}, nil); err != nil {
		t.Fatal(err)
	}
	t.Logf("the other replica waited %s for the lock of a silent session", waited.Round(time.Millisecond))
}

// freshDatabase creates a database of the test's own on the server admin
// names and returns its DSN.
func freshDatabase(t *testing.T, admin string) string {
	t.Helper()
	db, err := sql.Open("pgx", admin)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	b := make([]byte, 6)
	rand.Read(b)
	name := "journal_" + hex.EncodeToString(b)
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if db, err := sql.Open("pgx", admin); err == nil {
			db.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)")
			db.Close()
		}
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return u.String()
}

// TestOutageRechecksTheStoredLog: after a commit failed because the
// database was unavailable, the next commit checks the stored log against
// its latest signed checkpoint even though its size did not change. Here
// the database came back with another history of the same size (a restore
// from elsewhere, then another replica's append): appending on top of it
// would sign a root the stored entries do not give, a fork.
func TestOutageRechecksTheStoredLog(t *testing.T) {
	ctx := context.Background()
	dsn := t.TempDir() + "/journal.db"
	_, key, _ := ed25519.GenerateKey(rand.Reader)
	signer, vkey, err := NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	open := func() *Store {
		s, err := Open(ctx, Config{DSN: dsn, Signer: signer, VerifierKey: vkey})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	a := open()
	if _, err := a.RecordIssuance(ctx, Issuance{Time: time.Now(), Serial: "01", SPIFFEID: "spiffe://td/a"}, nil); err != nil {
		t.Fatal(err)
	}
	// While a cannot reach it, the database loses a's entry and another
	// writer appends a different one at the same index.
	if _, err := a.db.ExecContext(ctx, `DELETE FROM entries; DELETE FROM checkpoints`); err != nil {
		t.Fatal(err)
	}
	b := open()
	if _, err := b.RecordIssuance(ctx, Issuance{Time: time.Now(), Serial: "02", SPIFFEID: "spiffe://td/b"}, nil); err != nil {
		t.Fatal(err)
	}
	// What a's committer records after a commit failed with ErrUnavailable.
	a.noteAvailability(ErrUnavailable)

	_, err = a.RecordIssuance(ctx, Issuance{Time: time.Now(), Serial: "03", SPIFFEID: "spiffe://td/a"}, nil)
	if !errors.Is(err, ErrTampered) {
		t.Fatalf("append after the outage = %v; want ErrTampered", err)
	}
	var n int
	if err := b.db.QueryRowContext(ctx, `SELECT COUNT(*) FROM entries`).Scan(&n); err != nil || n != 1 {
		t.Fatalf("the log holds %d entries (%v); want b's one", n, err)
	}
}
