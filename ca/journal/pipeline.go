package journal

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/stdlib"
)

// uniqueViolation is PostgreSQL's SQLSTATE for a duplicate key.
const uniqueViolation = "23505"

// rollbackTimeout bounds the ROLLBACK that ends a pipelined transaction
// which did not commit.
const rollbackTimeout = 5 * time.Second

// commitPipelined commits a batch on PostgreSQL in three round trips of
// pipelined statements on one connection:
//
//  1. BEGIN; the append lock; the log's size; the largest checkpoint size.
//  2. The rows.
//  3. The signed checkpoint; COMMIT.
//
// When the size shows that another writer appended (or after an outage),
// one more round trip between the first two reads the new rows and the
// latest checkpoint; the committer catches up and checks them against the
// signed checkpoint (vouch), as the SQLite transaction does. Only then does
// it stage, and it signs only once the database has taken the rows: the
// checkpoint key never signs a tree before this committer holds the append
// lock and has every row appended before it, so it never signs two
// different trees of one size, and a row INSERT that fails leaves no
// signed note behind. A checkpoint row beyond the log's size (one the
// checkpoint INSERT would collide with after signing) is refused as
// tampering before anything is signed (checkpointBeyond).
//
// A commit that appends nothing (every precondition failed, or a catch-up
// alone) takes round trips 1 and 3, the latter being COMMIT alone.
//
// An op with a precondition takes this path too: preconditions read the
// ledger, never the database, so they need no savepoint.
func (s *Store) commitPipelined(ctx context.Context, batch []*op) (opErrs []error, signed []byte, err error) {
	conn, err := s.db.Conn(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("journal: %w", err)
	}
	// A session left inside a transaction is discarded by the driver
	// (stdlib's ResetSession), never reused.
	defer conn.Close()
	err = conn.Raw(func(dc any) error {
		c, ok := dc.(*stdlib.Conn)
		if !ok {
			return fmt.Errorf("journal: PostgreSQL connection is a %T, not pgx's", dc)
		}
		opErrs, signed, err = s.pipeline(ctx, c.Conn(), batch)
		return err
	})
	return opErrs, signed, err
}

func (s *Store) pipeline(ctx context.Context, c *pgx.Conn, batch []*op) (opErrs []error, signed []byte, err error) {
	defer func() {
		if c.PgConn().TxStatus() == 'I' {
			return
		}
		// Not committed: end the transaction, and with it the append
		// lock, now rather than when the session is dropped.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), rollbackTimeout)
		defer cancel()
		if _, rerr := c.Exec(rctx, "ROLLBACK"); rerr != nil {
			c.Close(rctx) //nolint:errcheck // the session is dropped either way
		}
	}()

	saved, err := copyRange(&s.hasher.f, s.rng)
	if err != nil {
		return nil, nil, err
	}
	savedLedger := s.ledger.size()
	defer func() {
		if err != nil {
			s.rng = saved
			s.ledger.truncate(savedLedger)
		}
	}()

	// Round trip 1: the lock, then the log's size and the largest
	// checkpoint's size under it. READ COMMITTED gives each SELECT a
	// snapshot taken after the lock was granted, so it sees every row the
	// previous holder committed.
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue(postgresAppendLock)
	var n, cpMax int64
	b.Queue(nextIndexQuery).QueryRow(func(r pgx.Row) error { return r.Scan(&n) })
	b.Queue(maxCheckpointQuery).QueryRow(func(r pgx.Row) error { return r.Scan(&cpMax) })
	if err := c.SendBatch(ctx, b).Close(); err != nil {
		return nil, nil, fmt.Errorf("journal: begin and lock: %w", err)
	}
	if err := checkpointBeyond(cpMax, n); err != nil {
		return nil, nil, err
	}
	before := s.rng.End()
	var latest []byte
	var found bool
	if n < 0 || uint64(n) != before || s.recheck {
		// Only when another writer appended, or after an outage: one more
		// round trip, in the same transaction, for the new rows and the
		// latest checkpoint. (Sent with every commit, the rows' query was
		// planned anew each time: a quarter of PostgreSQL's CPU per append.)
		b := &pgx.Batch{}
		b.Queue(entriesFromQuery, int64(before))
		b.Queue(latestCheckpointQuery)
		br := c.SendBatch(ctx, b)
		latest, found, err = s.readCatchUp(br, n)
		if cerr := br.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("journal: catch up: %w", cerr)
		}
		if err != nil {
			return nil, nil, err
		}
	}
	vouched, err := s.vouch(s.rng.End() != before, func() error { return s.checkSigned(latest, found) })
	if err != nil {
		return nil, nil, err
	}
	if vouched {
		if saved, err = copyRange(&s.hasher.f, s.rng); err != nil {
			return nil, nil, err
		}
		savedLedger = s.ledger.size()
	}

	var buf rows
	opErrs, appended, err := s.stage(batch, &buf)
	if err != nil {
		return nil, nil, err
	}
	b = &pgx.Batch{}
	if appended {
		// Round trip 2: the rows, in a round trip of their own. No signed
		// note leaves the process before the database has taken its rows.
		rb := &pgx.Batch{}
		if err := buf.chunks(func(k int, vals []any) error {
			rb.Queue(insertEntriesQueries[k], vals...)
			return nil
		}); err != nil {
			return nil, nil, err
		}
		if err := c.SendBatch(ctx, rb).Close(); err != nil {
			return nil, nil, fmt.Errorf("journal: append: %w", err)
		}
		cp, note, err := s.sign()
		if err != nil {
			return nil, nil, err
		}
		signed = note
		b.Queue(insertCheckpointQuery, int64(cp.Size), cp.Root, signed, time.Now().UnixNano())
	}
	// Round trip 3: the checkpoint and COMMIT (or COMMIT alone).
	var committed bool
	b.Queue("COMMIT").Exec(func(tag pgconn.CommandTag) error {
		// COMMIT of a failed transaction answers ROLLBACK, not an error.
		committed = tag.String() == "COMMIT"
		return nil
	})
	if err := c.SendBatch(ctx, b).Close(); err != nil {
		var pg *pgconn.PgError
		if errors.As(err, &pg) && pg.Code == uniqueViolation && pg.TableName == "checkpoints" {
			// Round trip 1 found no checkpoint at this size, and no other
			// committer writes one without the append lock: a row was
			// inserted behind the journal's back in a transaction that
			// committed while this one held the lock. The note just signed
			// is orphaned; failing closed here keeps this process from
			// signing a different tree of the same size next.
			return nil, nil, fmt.Errorf("%w: a checkpoint row at size %d was inserted behind the journal while it committed; the note it signed there is orphaned: %w", ErrTampered, s.rng.End(), err)
		}
		return nil, nil, fmt.Errorf("journal: commit: %w", err)
	}
	if !committed {
		return nil, nil, errors.New("journal: commit: the transaction was rolled back")
	}
	if appended {
		s.ledger.publish()
	}
	return opErrs, signed, nil
}

// readCatchUp reads the catch-up round trip: it extends the in-memory log
// to n entries with the rows another writer appended (extend), and returns
// the latest stored checkpoint's note, found false when there is none.
func (s *Store) readCatchUp(br pgx.BatchResults, n int64) (latest []byte, found bool, err error) {
	rows, err := br.Query()
	if err != nil {
		return nil, false, fmt.Errorf("journal: %w", err)
	}
	err = s.extend(n, rows)
	rows.Close()
	if err != nil {
		return nil, false, err
	}
	if err := rows.Err(); err != nil {
		return nil, false, fmt.Errorf("journal: %w", err)
	}
	var size int64
	switch err := br.QueryRow().Scan(&size, &latest); {
	case errors.Is(err, pgx.ErrNoRows):
		return nil, false, nil
	case err != nil:
		return nil, false, fmt.Errorf("journal: %w", err)
	}
	return latest, true, nil
}
