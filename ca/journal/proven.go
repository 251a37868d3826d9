package journal

import (
	"bytes"
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"

	"github.com/transparency-dev/merkle/rfc6962"
)

// DefaultRecheckInterval is how often Watch re-reads the whole log by
// default.
const DefaultRecheckInterval = 5 * time.Minute

// ErrUnproven is returned by lookups on a journal whose entries no signed
// checkpoint vouches for: one opened over existing entries without a
// verifier key.
var ErrUnproven = errors.New("journal: no verifier key vouches for the stored entries")

// tampered records err as the reason the log cannot be trusted, and
// returns it.
func (s *Store) tampered(err error) error {
	s.setIntegrity(err)
	return err
}

// readable fails when lookups cannot rely on the ledger.
func (s *Store) readable() error {
	if err := s.Integrity(); err != nil {
		return err
	}
	if s.unproven {
		return ErrUnproven
	}
	return nil
}

// fresh brings the ledger up to the stored log, so that a lookup sees
// what other writers (replicas, the CLI) appended: tokens they created,
// identities they revoked. When the log has grown, the committer catches up
// and checks the new entries against the latest signed checkpoint; the
// common case costs one primary-key read.
func (s *Store) fresh(ctx context.Context) error {
	if err := s.readable(); err != nil {
		return err
	}
	// What the ledger holds first: it only grows, and every entry in it was
	// committed before the read below, so the log can only be longer.
	have := s.ledger.publishedSize()
	// Read before the log, so that a commit between the two reads is
	// caught by the next lookup (walindex.go).
	var h walHeader
	hok := false
	if s.wal != nil {
		if h, hok = s.wal.header(); hok && s.wal.unchanged(h, have) {
			return nil
		}
	}
	s.sizeReads.Add(1)
	var n int64
	if err := s.stmts.nextIndex.QueryRowContext(ctx).Scan(&n); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	switch {
	case uint64(n) == have:
		if hok {
			s.wal.record(h, uint64(n))
		}
		return nil
	case uint64(n) < have:
		return s.tampered(fmt.Errorf("%w: it holds %d entries, %d were verified", ErrTampered, n, have))
	}
	if err := s.submit(ctx, &op{}); err != nil {
		return err
	}
	if err := s.readable(); err != nil {
		return err
	}
	// The log held n entries at most when h was read, and the ledger now
	// holds at least those.
	if hok && s.ledger.publishedSize() >= uint64(n) {
		s.wal.record(h, uint64(n))
	}
	return nil
}

// verifiedRecord reads the row the serial column names for kind and
// decodes it into rec, once its body is proven to be the verified leaf at
// its index. A row that fails the proof, or whose body is not of the kind
// its column says, is a rewrite: the journal then fails closed.
func (s *Store) verifiedRecord(ctx context.Context, serial string, kind Kind, rec any) error {
	if err := s.readable(); err != nil {
		return err
	}
	var idx int64
	var col Kind
	var body []byte
	err := s.stmts.entryBySerial.QueryRowContext(ctx, serial, string(kind)).Scan(&idx, &col, &body)
	if errors.Is(err, sql.ErrNoRows) {
		return ErrNotFound
	}
	if err != nil {
		return err
	}
	leaf, ok := s.ledger.leaf(uint64(idx))
	if !ok {
		// Newer than the ledger: appended elsewhere since it caught up.
		if err := s.fresh(ctx); err != nil {
			return err
		}
		if leaf, ok = s.ledger.leaf(uint64(idx)); !ok {
			return ErrNotFound
		}
	}
	if got := rfc6962.DefaultHasher.HashLeaf(body); !bytes.Equal(got, leaf[:]) {
		return s.tampered(fmt.Errorf("%w: entry %d no longer matches the signed log", ErrTampered, idx))
	}
	if _, err := (Entry{Index: uint64(idx), Kind: kind, Body: body}).decodeInto(rec); err != nil {
		return s.tampered(fmt.Errorf("%w: %v", ErrTampered, err))
	}
	return nil
}

// Recheck re-reads every entry the ledger holds and compares it with the
// verified leaf at its index, so that a rewrite of any old row is found,
// whether or not a lookup reads it. A mismatch, or a missing row, fails the
// journal closed and is returned.
func (s *Store) Recheck(ctx context.Context) error {
	if err := s.readable(); err != nil {
		return err
	}
	n := s.ledger.publishedSize()
	const page = 4096
	for from := uint64(0); from < n; {
		to := min(from+page, n)
		next, err := s.recheckPage(ctx, from, to)
		if err != nil {
			return err
		}
		if next != to {
			return s.tampered(fmt.Errorf("%w: entry %d is missing", ErrTampered, next))
		}
		from = to
	}
	return nil
}

// recheckPage checks entries [from, to) and returns the index after the
// last one it found in sequence.
func (s *Store) recheckPage(ctx context.Context, from, to uint64) (uint64, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT idx, body FROM entries WHERE idx >= $1 AND idx < $2 ORDER BY idx`, int64(from), int64(to))
	if err != nil {
		return from, fmt.Errorf("journal: recheck: %w", err)
	}
	defer rows.Close()
	next := from
	for rows.Next() {
		var idx int64
		var body []byte
		if err := rows.Scan(&idx, &body); err != nil {
			return next, fmt.Errorf("journal: recheck: %w", err)
		}
		if uint64(idx) != next {
			return next, nil
		}
		leaf, ok := s.ledger.leaf(next)
		if !ok || !bytes.Equal(rfc6962.DefaultHasher.HashLeaf(body), leaf[:]) {
			return next, s.tampered(fmt.Errorf("%w: entry %d no longer matches the signed log", ErrTampered, idx))
		}
		next++
	}
	if err := rows.Err(); err != nil {
		return next, fmt.Errorf("journal: recheck: %w", err)
	}
	return next, nil
}

// Watch rechecks the whole log every RecheckInterval until ctx ends. A
// rewrite it finds fails the journal closed (see Integrity); Watch goes on,
// so that the process stays up to say why.
func (s *Store) Watch(ctx context.Context) error {
	for {
		t := s.cfg.Clock.NewTimer(s.cfg.RecheckInterval)
		select {
		case <-ctx.Done():
			t.Stop()
			return nil
		case <-t.C():
		}
		if err := s.Recheck(ctx); err != nil && !errors.Is(err, ErrTampered) && ctx.Err() == nil {
			s.cfg.Log.Error("could not recheck the journal; will retry", "error", err)
		}
	}
}

// redeemable checks, in the committer, that an issuance may redeem a join
// token: the ledger must hold the token's creation with this hash, id and
// identity, and no redemption or revocation of it, and the issuance must
// come before it expires.
func (l *ledger) redeemable(redeem *Redemption, iss Issuance, bound uint64) error {
	t, ok := l.token(redeem.TokenHash, bound)
	switch {
	case !ok, t.rec.TokenID != redeem.TokenID, t.rec.SPIFFEID != iss.SPIFFEID,
		!iss.Time.Before(t.rec.ExpiresAt), t.redeemed:
		return ErrTokenSpent
	}
	if _, revoked := l.revokedAfter(t.rec.SPIFFEID, t.created, bound); revoked {
		return ErrTokenSpent
	}
	return nil
}

// standing counts, in the committer, the enrolments and unused tokens of
// id that no revocation has ended yet.
func (l *ledger) standing(id string, bound uint64) (enrolments, tokens int) {
	for tid := range l.tokens {
		t, ok := l.tokenByID(tid, bound)
		if !ok || t.rec.SPIFFEID != id {
			continue
		}
		if _, revoked := l.revokedAfter(id, t.created, bound); revoked {
			continue
		}
		if t.redeemed {
			enrolments++
		} else {
			tokens++
		}
	}
	return enrolments, tokens
}
