package journal

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"sync"
	"time"
)

// DefaultLatestRefresh is how long the newest issuance time the clock guard
// reads (LatestIssuanceTime) is served from memory before the database is
// read again. See latestCache for what a stale value can let through.
const DefaultLatestRefresh = time.Second

// latestCache is the newest issuance time for the clock guard, so that the
// CA does not read the database before every signature.
//
// What it holds is never newer than the truth: every issuance this Store
// commits raises it before its caller learns the outcome, and a read of
// the database raises it to what the log holds. It can only lag, and only
// behind issuances written by another writer (a replica sharing the
// PostgreSQL journal, another process on the file) since the last read.
// Those are picked up by the read on the schedule (Config.LatestRefresh),
// or at once when a commit of this Store finds rows appended elsewhere or
// follows an outage, which drops the cached read. So a lagging value can
// let a replica's clock go on signing, for at most one refresh interval,
// while it is behind another replica's newest issuance by more than the
// allowance; it can never refuse a clock that is in bounds, and a clock
// that jumps back behind this replica's own issuances is refused at once.
// A clock that steps back before the last read counts as due for a read:
// the age of the read is measured on the same clock, and a negative age is
// not trusted.
type latestCache struct {
	mu sync.Mutex
	// t is the greatest issuance time known; readAt when the database was
	// last read (zero: never since the cache was dropped).
	t      time.Time
	readAt time.Time
	// reads counts database reads (tests).
	reads int
}

// raise records an issuance time known to be in the log.
func (c *latestCache) raise(t time.Time) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if t.After(c.t) {
		c.t = t
	}
}

// drop makes the next LatestIssuanceTime read the database.
func (c *latestCache) drop() {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.readAt = time.Time{}
}

// LatestIssuanceTime is the latest time at which the log records an
// issuance (the greatest, not the last appended), zero with no error when
// there is none. The CA compares its clock with it
// before it signs (ca/clock.go): a clock far behind the newest issuance has
// jumped backwards.
//
// Only issuances count. Refusals, join-token creations, revocations and
// rotation steps are dated by whatever clock wrote them, including a clock
// that has just jumped backwards: were they to count, the first refusal
// journalled under a clock that went back would make that clock look in
// bounds. An issuance is journalled only once the CA has checked its clock,
// so the latest one is the latest time the log vouches for. The greatest
// time, not the last row's, counts: a clock stepped back a little at a time,
// each step within the CA's allowance, must not walk the bound back with it.
//
// It is served from memory (latestCache) and reads the database at most
// once per Config.LatestRefresh.
func (s *Store) LatestIssuanceTime(ctx context.Context) (time.Time, error) {
	now := s.cfg.Clock.Now()
	c := &s.latest
	c.mu.Lock()
	t, readAt := c.t, c.readAt
	c.mu.Unlock()
	if !readAt.IsZero() && !now.Before(readAt) && now.Sub(readAt) < s.cfg.LatestRefresh {
		return t, nil
	}
	stored, err := s.readLatestIssuanceTime(ctx)
	if err != nil {
		return time.Time{}, err
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.reads++
	if stored.After(c.t) {
		c.t = stored
	}
	c.readAt = now
	return c.t, nil
}

// readLatestIssuanceTime reads one row through the time index and decodes
// only its body (the time the record holds, not the unsigned time column).
func (s *Store) readLatestIssuanceTime(ctx context.Context) (time.Time, error) {
	var body []byte
	var idx int64
	err := s.db.QueryRowContext(ctx, `SELECT idx, body FROM entries WHERE kind = $1 ORDER BY time_ns DESC, idx DESC LIMIT 1`,
		string(KindIssuance)).Scan(&idx, &body)
	if errors.Is(err, sql.ErrNoRows) {
		return time.Time{}, nil
	}
	if err != nil {
		return time.Time{}, fmt.Errorf("journal: latest issuance: %w", unavailable(err))
	}
	var iss Issuance
	if _, err := (Entry{Index: uint64(idx), Kind: KindIssuance, Body: body}).decodeInto(&iss); err != nil {
		return time.Time{}, fmt.Errorf("journal: latest issuance: %w", err)
	}
	return iss.Time, nil
}
