package journal

import (
	"context"
	"database/sql"
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
func (s *Store) RecordIssuance(ctx context.Context, iss Issuance, redeem *Redemption) (int64, error) {
	iss.Time, iss.NotBefore, iss.NotAfter = iss.Time.UTC(), iss.NotBefore.UTC(), iss.NotAfter.UTC()
	body, err := encode(KindIssuance, iss)
	if err != nil {
		return 0, err
	}
	o := &op{entries: []pending{{kind: KindIssuance, time: iss.Time, spiffeID: iss.SPIFFEID, serial: iss.Serial, body: body}}}
	if redeem != nil {
		o.pre = func(ctx context.Context, tx *sql.Tx) error {
			res, err := tx.ExecContext(ctx, `UPDATE join_tokens SET used_ns = $1
				WHERE token_hash = $2 AND token_id = $3 AND spiffe_id = $4
				AND used_ns IS NULL AND revoked_ns IS NULL AND expires_ns > $1`,
				iss.Time.UnixNano(), redeem.TokenHash, redeem.TokenID, iss.SPIFFEID)
			if err != nil {
				return fmt.Errorf("journal: redeem: %w", err)
			}
			if n, err := res.RowsAffected(); err != nil {
				return fmt.Errorf("journal: redeem: %w", err)
			} else if n != 1 {
				return ErrTokenSpent
			}
			_, err = tx.ExecContext(ctx, `INSERT INTO enrolments (id, spiffe_id, enrolled_ns) VALUES ($1, $2, $3)`,
				redeem.TokenID, iss.SPIFFEID, iss.Time.UnixNano())
			if err != nil {
				return fmt.Errorf("journal: enrol: %w", err)
			}
			return nil
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

// CreateJoinToken stores a new token's hash and records its creation.
func (s *Store) CreateJoinToken(ctx context.Context, hash []byte, tok JoinToken) error {
	rec := JoinTokenCreated{Time: tok.CreatedAt.UTC(), TokenID: tok.ID, SPIFFEID: tok.SPIFFEID, ExpiresAt: tok.ExpiresAt.UTC()}
	body, err := encode(KindJoinToken, rec)
	if err != nil {
		return err
	}
	o := &op{
		pre: func(ctx context.Context, tx *sql.Tx) error {
			_, err := tx.ExecContext(ctx, `INSERT INTO join_tokens (token_hash, token_id, spiffe_id, created_ns, expires_ns)
				VALUES ($1, $2, $3, $4, $5)`, hash, tok.ID, tok.SPIFFEID, tok.CreatedAt.UnixNano(), tok.ExpiresAt.UnixNano())
			return err
		},
		entries: []pending{{kind: KindJoinToken, time: rec.Time, spiffeID: rec.SPIFFEID, serial: rec.TokenID, body: body}},
	}
	if err := s.submit(ctx, o); err != nil {
		return fmt.Errorf("journal: create join token: %w", err)
	}
	return nil
}

// Revoke revokes every standing enrolment of an identity and every unused
// join token bound to it, and records that it did.
func (s *Store) Revoke(ctx context.Context, spiffeID string, now time.Time) (Revocation, error) {
	rev := Revocation{Time: now.UTC(), SPIFFEID: spiffeID}
	o := &op{}
	o.pre = func(ctx context.Context, tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE enrolments SET revoked_ns = $1 WHERE spiffe_id = $2 AND revoked_ns IS NULL`,
			now.UnixNano(), spiffeID)
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		if err != nil {
			return err
		}
		rev.Enrolments = int(n)
		res, err = tx.ExecContext(ctx, `UPDATE join_tokens SET revoked_ns = $1
			WHERE spiffe_id = $2 AND used_ns IS NULL AND revoked_ns IS NULL`, now.UnixNano(), spiffeID)
		if err != nil {
			return err
		}
		if n, err = res.RowsAffected(); err != nil {
			return err
		}
		rev.Tokens = int(n)
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

// LookupJoinToken returns the token with the given hash, or ErrNotFound.
func (s *Store) LookupJoinToken(ctx context.Context, hash []byte) (JoinToken, error) {
	var tok JoinToken
	var created, expires int64
	var used, revoked sql.NullInt64
	err := s.stmts.joinToken.QueryRowContext(ctx, hash).Scan(&tok.ID, &tok.SPIFFEID, &created, &expires, &used, &revoked)
	if errors.Is(err, sql.ErrNoRows) {
		return JoinToken{}, ErrNotFound
	}
	if err != nil {
		return JoinToken{}, fmt.Errorf("journal: look up join token: %w", err)
	}
	tok.CreatedAt, tok.ExpiresAt = fromNanos(created), fromNanos(expires)
	tok.UsedAt, tok.RevokedAt = fromNullNanos(used), fromNullNanos(revoked)
	return tok, nil
}

// Enrolment is the standing of an identity enrolled with a join token.
type Enrolment struct {
	ID         string
	SPIFFEID   string
	EnrolledAt time.Time
	RevokedAt  time.Time // zero when not revoked
}

// LookupEnrolment returns the enrolment with the given id, or ErrNotFound.
func (s *Store) LookupEnrolment(ctx context.Context, id string) (Enrolment, error) {
	e := Enrolment{ID: id}
	var enrolled int64
	var revoked sql.NullInt64
	err := s.stmts.enrolment.QueryRowContext(ctx, id).
		Scan(&e.SPIFFEID, &enrolled, &revoked)
	if errors.Is(err, sql.ErrNoRows) {
		return Enrolment{}, ErrNotFound
	}
	if err != nil {
		return Enrolment{}, fmt.Errorf("journal: look up enrolment: %w", err)
	}
	e.EnrolledAt, e.RevokedAt = fromNanos(enrolled), fromNullNanos(revoked)
	return e, nil
}

// LookupIssuance returns the issuance of the certificate with the given
// serial (lower-case hex), or ErrNotFound.
func (s *Store) LookupIssuance(ctx context.Context, serial string) (Issuance, error) {
	e, err := s.issuanceEntry(ctx, serial)
	if err != nil {
		return Issuance{}, err
	}
	rec, err := e.Decode()
	if err != nil {
		return Issuance{}, err
	}
	return *rec.(*Issuance), nil
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
// creation, or ErrNotFound. The token table alone is not trusted: a token
// counts only if the signed log records its creation.
func (s *Store) LookupJoinTokenCreation(ctx context.Context, tokenID string) (JoinTokenCreated, error) {
	var e Entry
	var idx int64
	err := s.stmts.entryBySerial.QueryRowContext(ctx, tokenID, string(KindJoinToken)).Scan(&idx, &e.Kind, &e.Body)
	if errors.Is(err, sql.ErrNoRows) {
		return JoinTokenCreated{}, ErrNotFound
	}
	if err != nil {
		return JoinTokenCreated{}, fmt.Errorf("journal: look up join token %s: %w", tokenID, err)
	}
	rec, err := e.Decode()
	if err != nil {
		return JoinTokenCreated{}, err
	}
	return *rec.(*JoinTokenCreated), nil
}
