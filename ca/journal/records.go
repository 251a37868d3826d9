package journal

import (
	"context"
	"database/sql"
	"encoding/hex"
	"errors"
	"fmt"
	"time"
)

// Redemption names the join token an issuance consumes. The token is marked
// used in the same transaction that records the issuance, so a token is spent
// exactly when a certificate is issued for it, and never twice.
type Redemption struct {
	TokenHash []byte
	TokenID   string
}

// RecordIssuance durably appends an issuance, redeeming a join token first
// when one is given, and returns the entry's index in the log. Nothing is
// written if any step fails.
//
// A redemption is checked against the ledger inside the commit, after
// catching up with every other writer: the token's signed creation must
// match (hash, id, identity), it must not have expired, been spent or been
// revoked. The issuance itself is then what spends the token and enrols the
// identity, so that no table beside the log can say otherwise.
func (s *Store) RecordIssuance(ctx context.Context, iss Issuance, redeem *Redemption) (int64, error) {
	iss.Time, iss.NotBefore, iss.NotAfter = iss.Time.UTC(), iss.NotBefore.UTC(), iss.NotAfter.UTC()
	if redeem != nil && (iss.Method != "join-token" || iss.EnrolmentID != redeem.TokenID) {
		return 0, fmt.Errorf("journal: record issuance of %s: a redemption of join token %s must be a join-token issuance enrolling it", iss.Serial, redeem.TokenID)
	}
	body, err := encode(KindIssuance, iss)
	if err != nil {
		return 0, err
	}
	o := &op{entries: []pending{{kind: KindIssuance, time: iss.Time, spiffeID: iss.SPIFFEID, serial: iss.Serial, body: body}}}
	if redeem != nil {
		o.pre = func() error {
			return s.ledger.redeemable(redeem, iss, s.ledger.size())
		}
	}
	if err := s.submit(ctx, o); err != nil {
		return 0, fmt.Errorf("journal: record issuance of %s: %w", iss.Serial, err)
	}
	return int64(o.first), nil
}

// AppendRefusals appends refusal records in one commit.
func (s *Store) AppendRefusals(ctx context.Context, refusals []Refusal) error {
	o := &op{}
	for _, r := range refusals {
		r.First, r.Last = r.First.UTC(), r.Last.UTC()
		body, err := encode(KindRefusal, r)
		if err != nil {
			return err
		}
		o.entries = append(o.entries, pending{kind: KindRefusal, time: r.First, spiffeID: r.SPIFFEID, body: body})
	}
	if err := s.submit(ctx, o); err != nil {
		return fmt.Errorf("journal: append refusals: %w", err)
	}
	return nil
}

// JoinToken is the stored state of a join token.
type JoinToken struct {
	ID        string
	SPIFFEID  string
	CreatedAt time.Time
	ExpiresAt time.Time
	UsedAt    time.Time // zero when unused
	RevokedAt time.Time // zero when not revoked
}

// CreateJoinToken records a new token's creation: its id, its hash, the
// identity it proves and when it expires.
func (s *Store) CreateJoinToken(ctx context.Context, hash []byte, tok JoinToken) error {
	rec := JoinTokenCreated{Time: tok.CreatedAt.UTC(), TokenID: tok.ID, TokenSHA256: hex.EncodeToString(hash),
		SPIFFEID: tok.SPIFFEID, ExpiresAt: tok.ExpiresAt.UTC()}
	body, err := encode(KindJoinToken, rec)
	if err != nil {
		return err
	}
	o := &op{
		pre: func() error {
			bound := s.ledger.size()
			if _, dup := s.ledger.tokenByID(tok.ID, bound); dup {
				return fmt.Errorf("journal: join token %s exists", tok.ID)
			}
			if _, dup := s.ledger.token(hash, bound); dup {
				return errors.New("journal: a join token with that hash exists")
			}
			return nil
		},
		entries: []pending{{kind: KindJoinToken, time: rec.Time, spiffeID: rec.SPIFFEID, serial: rec.TokenID, body: body}},
	}
	if err := s.submit(ctx, o); err != nil {
		return fmt.Errorf("journal: create join token: %w", err)
	}
	return nil
}

// Revoke revokes every standing enrolment of an identity and every unused
// join token bound to it, by recording a revocation: the ledger counts
// whatever the identity enrolled, or was given a token for, before it as
// revoked.
func (s *Store) Revoke(ctx context.Context, spiffeID string, now time.Time) (Revocation, error) {
	return s.revoke(ctx, spiffeID, now, false)
}

// ErrNothingToRevoke: the identity has no standing enrolment and no unused
// join token.
var ErrNothingToRevoke = errors.New("journal: nothing to revoke")

// RevokeStanding is Revoke, except that it writes nothing and returns
// ErrNothingToRevoke when the identity has nothing standing. The check and
// the append are one transaction.
func (s *Store) RevokeStanding(ctx context.Context, spiffeID string, now time.Time) (Revocation, error) {
	return s.revoke(ctx, spiffeID, now, true)
}

func (s *Store) revoke(ctx context.Context, spiffeID string, now time.Time, mustStand bool) (Revocation, error) {
	rev := Revocation{Time: now.UTC(), SPIFFEID: spiffeID}
	o := &op{}
	o.pre = func() error {
		rev.Enrolments, rev.Tokens = s.ledger.standing(spiffeID, s.ledger.size())
		if mustStand && rev.Enrolments == 0 && rev.Tokens == 0 {
			return ErrNothingToRevoke
		}
		body, err := encode(KindRevocation, rev)
		if err != nil {
			return err
		}
		o.entries = []pending{{kind: KindRevocation, time: rev.Time, spiffeID: spiffeID, body: body}}
		return nil
	}
	if err := s.submit(ctx, o); err != nil {
		return Revocation{}, fmt.Errorf("journal: revoke %s: %w", spiffeID, err)
	}
	return rev, nil
}

// LookupJoinToken returns the token with the given hash, or ErrNotFound. It
// is read from the ledger: a token exists only if the signed log records
// its creation with this hash, it is used once an issuance redeemed it, and
// revoked once a revocation of its identity followed its creation.
func (s *Store) LookupJoinToken(ctx context.Context, hash []byte) (JoinToken, error) {
	if err := s.fresh(ctx); err != nil {
		return JoinToken{}, fmt.Errorf("journal: look up join token: %w", err)
	}
	l := s.ledger
	l.mu.RLock()
	defer l.mu.RUnlock()
	t, ok := l.token(hash, l.published)
	if !ok {
		return JoinToken{}, ErrNotFound
	}
	tok := JoinToken{ID: t.rec.TokenID, SPIFFEID: t.rec.SPIFFEID, CreatedAt: t.rec.Time, ExpiresAt: t.rec.ExpiresAt}
	if t.redeemed {
		tok.UsedAt = t.enrolledAt
	}
	if r, ok := l.revokedAfter(t.rec.SPIFFEID, t.created, l.published); ok && (!t.redeemed || r.idx < t.redemption) {
		tok.RevokedAt = r.time
	}
	return tok, nil
}

// Enrolment is the standing of an identity enrolled with a join token.
type Enrolment struct {
	ID         string
	SPIFFEID   string
	EnrolledAt time.Time
	RevokedAt  time.Time // zero when not revoked
}

// LookupEnrolment returns the enrolment with the given id (the id of the
// join token it redeemed), or ErrNotFound. It is read from the ledger: the
// enrolment is the issuance that redeemed the token, and it is revoked once
// a revocation of its identity follows it.
func (s *Store) LookupEnrolment(ctx context.Context, id string) (Enrolment, error) {
	if err := s.fresh(ctx); err != nil {
		return Enrolment{}, fmt.Errorf("journal: look up enrolment: %w", err)
	}
	l := s.ledger
	l.mu.RLock()
	defer l.mu.RUnlock()
	t, ok := l.tokenByID(id, l.published)
	if !ok || !t.redeemed {
		return Enrolment{}, ErrNotFound
	}
	e := Enrolment{ID: id, SPIFFEID: t.rec.SPIFFEID, EnrolledAt: t.enrolledAt}
	if r, ok := l.revokedAfter(t.rec.SPIFFEID, t.redemption, l.published); ok {
		e.RevokedAt = r.time
	}
	return e, nil
}

// LookupIssuance returns the issuance of the certificate with the given
// serial (lower-case hex), or ErrNotFound. The row is proven against the
// ledger before it counts.
func (s *Store) LookupIssuance(ctx context.Context, serial string) (Issuance, error) {
	var iss Issuance
	if err := s.verifiedRecord(ctx, serial, KindIssuance, &iss); err != nil {
		return Issuance{}, fmt.Errorf("journal: look up issuance %s: %w", serial, err)
	}
	if iss.Serial != serial {
		return Issuance{}, s.tampered(fmt.Errorf("%w: the row of serial %s holds the issuance of %s", ErrTampered, serial, iss.Serial))
	}
	return iss, nil
}

func (s *Store) issuanceEntry(ctx context.Context, serial string) (Entry, error) {
	var e Entry
	var idx int64
	err := s.stmts.entryBySerial.QueryRowContext(ctx, serial, string(KindIssuance)).Scan(&idx, &e.Kind, &e.Body)
	if errors.Is(err, sql.ErrNoRows) {
		return Entry{}, ErrNotFound
	}
	if err != nil {
		return Entry{}, fmt.Errorf("journal: look up issuance %s: %w", serial, err)
	}
	e.Index = uint64(idx)
	return e, nil
}

// Entries returns up to limit entries from index from on, in order.
func (s *Store) Entries(ctx context.Context, from uint64, limit int) ([]Entry, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT idx, kind, body, leaf_hash FROM entries WHERE idx >= $1 ORDER BY idx LIMIT $2`,
		int64(from), limit)
	if err != nil {
		return nil, fmt.Errorf("journal: list entries: %w", err)
	}
	defer rows.Close()
	var out []Entry
	for rows.Next() {
		var e Entry
		var idx int64
		if err := rows.Scan(&idx, &e.Kind, &e.Body, &e.LeafHash); err != nil {
			return nil, fmt.Errorf("journal: list entries: %w", err)
		}
		e.Index = uint64(idx)
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("journal: list entries: %w", err)
	}
	return out, nil
}

// StoredCheckpoint is a checkpoint as the database holds it.
type StoredCheckpoint struct {
	Size uint64
	Note []byte
	Time time.Time
}

// Checkpoints returns every stored checkpoint, by size.
func (s *Store) Checkpoints(ctx context.Context) ([]StoredCheckpoint, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT size, note, time_ns FROM checkpoints ORDER BY size`)
	if err != nil {
		return nil, fmt.Errorf("journal: list checkpoints: %w", err)
	}
	defer rows.Close()
	var out []StoredCheckpoint
	for rows.Next() {
		var c StoredCheckpoint
		var size, t int64
		if err := rows.Scan(&size, &c.Note, &t); err != nil {
			return nil, fmt.Errorf("journal: list checkpoints: %w", err)
		}
		c.Size, c.Time = uint64(size), fromNanos(t)
		out = append(out, c)
	}
	return out, rows.Err()
}

// LatestCheckpoint returns the stored checkpoint of the largest size, or
// ErrNotFound when none is stored. Its note is as stored: open it with
// ParseCheckpoint to trust it.
func (s *Store) LatestCheckpoint(ctx context.Context) (StoredCheckpoint, error) {
	var c StoredCheckpoint
	var size, t int64
	err := s.db.QueryRowContext(ctx, `SELECT size, note, time_ns FROM checkpoints ORDER BY size DESC LIMIT 1`).Scan(&size, &c.Note, &t)
	if errors.Is(err, sql.ErrNoRows) {
		return StoredCheckpoint{}, ErrNotFound
	}
	if err != nil {
		return StoredCheckpoint{}, fmt.Errorf("journal: latest checkpoint: %w", err)
	}
	c.Size, c.Time = uint64(size), fromNanos(t)
	return c, nil
}

// Meta returns a metadata value, or ErrNotFound.
func (s *Store) Meta(ctx context.Context, key string) (string, error) {
	var v string
	err := s.db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = $1`, key).Scan(&v)
	if errors.Is(err, sql.ErrNoRows) {
		return "", ErrNotFound
	}
	if err != nil {
		return "", fmt.Errorf("journal: read %s: %w", key, err)
	}
	return v, nil
}

// SetMetaOnce stores a metadata value unless one is stored already, and
// returns the value in force.
func (s *Store) SetMetaOnce(ctx context.Context, key, value string) (string, error) {
	if _, err := s.db.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING`, key, value); err != nil {
		return "", fmt.Errorf("journal: write %s: %w", key, err)
	}
	return s.Meta(ctx, key)
}

// RecordRotation durably appends a rotation step.
func (s *Store) RecordRotation(ctx context.Context, r Rotation) error {
	r.Time, r.NotAfter = r.Time.UTC(), r.NotAfter.UTC()
	body, err := encode(KindRotation, r)
	if err != nil {
		return err
	}
	if err := s.submit(ctx, &op{entries: []pending{{kind: KindRotation, time: r.Time, serial: r.Serial, body: body}}}); err != nil {
		return fmt.Errorf("journal: record rotation: %w", err)
	}
	return nil
}

// LookupJoinTokenCreation returns the journal's record of a token's
// creation, or ErrNotFound. The row is proven against the ledger: a row that
// claims a creation the signed log does not hold fails closed.
func (s *Store) LookupJoinTokenCreation(ctx context.Context, tokenID string) (JoinTokenCreated, error) {
	var rec JoinTokenCreated
	if err := s.verifiedRecord(ctx, tokenID, KindJoinToken, &rec); err != nil {
		return JoinTokenCreated{}, fmt.Errorf("journal: look up join token %s: %w", tokenID, err)
	}
	if rec.TokenID != tokenID {
		return JoinTokenCreated{}, s.tampered(fmt.Errorf("%w: the row of join token %s holds the creation of %s", ErrTampered, tokenID, rec.TokenID))
	}
	return rec, nil
}
