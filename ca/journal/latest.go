package journal

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"time"
)

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
// It reads one row through the time index and decodes only its body (the
// time the record holds, not the unsigned time column), so that it stays
// cheap on the issuance path.
func (s *Store) LatestIssuanceTime(ctx context.Context) (time.Time, error) {
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
