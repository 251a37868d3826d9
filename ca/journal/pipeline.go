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

// errHeadMoved: the pipelined commit found rows another writer appended.
// It has staged and signed nothing; the batch takes the full transaction,
// which catches them up and checks them against their signed checkpoint.
var errHeadMoved = errors.New("journal: the log grew elsewhere")

// rollbackTimeout bounds the ROLLBACK that ends a pipelined transaction
// which did not commit.
const rollbackTimeout = 5 * time.Second

// commitPipelined commits a batch on PostgreSQL in two round trips of
// pipelined statements on one connection:
//
//  1. BEGIN; the append lock; the log's size.
//  2. The rows; the signed checkpoint; COMMIT.
//
// The checkpoint is signed between the two, once this committer holds the
// append lock and has seen that the log ends where its in-memory tree does:
// the key never signs a tree of a size another writer may already have
// signed. When the log grew elsewhere, it rolls back and returns
// errHeadMoved with nothing staged or signed.
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

	// Round trip 1: the lock, then the size under it. READ COMMITTED gives
	// the SELECT a snapshot taken after the lock was granted, so it sees
	// every row the previous holder committed.
	var next int64
	b := &pgx.Batch{}
	b.Queue("BEGIN")
	b.Queue(postgresAppendLock)
	b.Queue(nextIndexQuery).QueryRow(func(r pgx.Row) error { return r.Scan(&next) })
	if err := c.SendBatch(ctx, b).Close(); err != nil {
		return nil, nil, fmt.Errorf("journal: begin and lock: %w", err)
	}
	if next < 0 || uint64(next) != s.rng.End() {
		// Grown elsewhere (or shrunk: the full transaction says so).
		return nil, nil, errHeadMoved
	}

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
	var buf rows
	opErrs, appended, err := s.stage(batch, &buf)
	if err != nil {
		return nil, nil, err
	}
	b = &pgx.Batch{}
	if appended {
		cp, note, err := s.sign()
		if err != nil {
			return nil, nil, err
		}
		signed = note
		if err := buf.chunks(func(k int, vals []any) error {
			b.Queue(insertEntriesQueries[k], vals...)
			return nil
		}); err != nil {
			return nil, nil, err
		}
		b.Queue(insertCheckpointQuery, int64(cp.Size), cp.Root, signed, time.Now().UnixNano())
	}
	// Round trip 2: the rows, the checkpoint and COMMIT (or COMMIT alone).
	var committed bool
	b.Queue("COMMIT").Exec(func(tag pgconn.CommandTag) error {
		// COMMIT of a failed transaction answers ROLLBACK, not an error.
		committed = tag.String() == "COMMIT"
		return nil
	})
	if err := c.SendBatch(ctx, b).Close(); err != nil {
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
