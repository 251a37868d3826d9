package journal_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// TestQueuedOpsAreRefusedOnceTampered attacks the fail-closed refusal of a
// squatted checkpoint with nothing but DML and an advisory lock, which any
// role may take. The owner holds a checkpoints row at the next size in an
// open transaction, so that the CA's checkpoint INSERT blocks after its note
// was signed; another caller's op queues behind it; the owner queues for the
// append lock, commits the squat (the CA's INSERT fails: tampering), then
// deletes it and lets go of the lock. Before the fix the queued op was
// committed next: the key signed a second tree of the orphaned size and the
// caller was told its record was durable, while Integrity() reported
// tampering.
func TestQueuedOpsAreRefusedOnceTampered(t *testing.T) {
	bs := backends(t)
	if len(bs) < 2 {
		t.Skip("the attack needs PostgreSQL's advisory lock; make test sets " + postgresEnv)
	}
	b := bs[1]
	ctx := context.Background()
	rec := &recordingSigner{Signer: testSigner}
	s, err := journal.Open(ctx, journal.Config{DSN: b.dsn, Signer: rec, VerifierKey: testVKey})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if _, err := s.RecordIssuance(ctx, renewal("a-1", "spiffe://cluster.local/a"), nil); err != nil {
		t.Fatal(err)
	}
	raw := b.raw(t)
	waitFor := func(cond string) {
		t.Helper()
		deadline := time.Now().Add(10 * time.Second)
		for {
			var n int
			if err := raw.QueryRow(`SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND ` + cond).Scan(&n); err != nil {
				t.Fatal(err)
			}
			if n > 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("timed out waiting for %s", cond)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	tx, err := raw.BeginTx(ctx, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer tx.Rollback() //nolint:errcheck // after Commit it is a no-op
	if _, err := tx.Exec(`INSERT INTO checkpoints (size, root, note, time_ns) VALUES (2, 'x', 'x', 0)`); err != nil {
		t.Fatal(err)
	}
	first := make(chan error, 1)
	go func() {
		_, err := s.RecordIssuance(ctx, renewal("a-2", "spiffe://cluster.local/a"), nil)
		first <- err
	}()
	waitFor(`wait_event = 'transactionid'`) // the CA's checkpoint INSERT waits on the squat
	queued := make(chan error, 1)
	go func() {
		_, err := s.RecordIssuance(ctx, renewal("q-2", "spiffe://cluster.local/q"), nil)
		queued <- err
	}()
	time.Sleep(100 * time.Millisecond) // q-2 queues behind the blocked batch
	lockConn, err := raw.Conn(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer lockConn.Close()
	locked := make(chan error, 1)
	go func() {
		_, err := lockConn.ExecContext(ctx, `SELECT pg_advisory_lock(7160321947)`)
		locked <- err
	}()
	waitFor(`wait_event_type = 'Lock' AND wait_event = 'advisory'`)
	if err := tx.Commit(); err != nil {
		t.Fatal(err)
	}
	if err := <-first; !errors.Is(err, journal.ErrTampered) {
		t.Fatalf("the append whose checkpoint was squatted: %v, want ErrTampered", err)
	}
	if err := <-locked; err != nil {
		t.Fatal(err)
	}
	if _, err := raw.Exec(`DELETE FROM checkpoints WHERE size = 2`); err != nil {
		t.Fatal(err)
	}
	if _, err := lockConn.ExecContext(ctx, `SELECT pg_advisory_unlock(7160321947)`); err != nil {
		t.Fatal(err)
	}
	if err := <-queued; !errors.Is(err, journal.ErrTampered) {
		t.Errorf("the op queued before the tampering was found: %v, want ErrTampered", err)
	}
	oneRootPerSize(t, rec)
}
