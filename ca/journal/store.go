package journal

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"time"

	_ "modernc.org/sqlite" // the embedded SQLite driver, registered as "sqlite"
)

// ErrTokenSpent is returned when an issuance tries to redeem a join token that
// has been used, revoked or has expired since it was authenticated.
var ErrTokenSpent = errors.New("journal: join token already used, revoked or expired")

const schema = `
CREATE TABLE IF NOT EXISTS meta (
	key   TEXT PRIMARY KEY,
	value TEXT NOT NULL
);
-- entries is the append-only record. body holds the exact bytes that later
-- become a Merkle leaf; the other columns only index it.
CREATE TABLE IF NOT EXISTS entries (
	seq       INTEGER PRIMARY KEY AUTOINCREMENT,
	kind      TEXT    NOT NULL,
	time_ns   INTEGER NOT NULL,
	spiffe_id TEXT    NOT NULL DEFAULT '',
	serial    TEXT    NOT NULL DEFAULT '',
	body      BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_serial ON entries(serial) WHERE serial != '';
CREATE INDEX IF NOT EXISTS entries_spiffe_id ON entries(spiffe_id, seq);
-- join_tokens holds only the SHA-256 of each token.
CREATE TABLE IF NOT EXISTS join_tokens (
	token_hash BLOB    PRIMARY KEY,
	token_id   TEXT    NOT NULL UNIQUE,
	spiffe_id  TEXT    NOT NULL,
	created_ns INTEGER NOT NULL,
	expires_ns INTEGER NOT NULL,
	used_ns    INTEGER,
	revoked_ns INTEGER
);
-- enrolments are created when a join token is redeemed; renewals of that
-- identity are checked against them.
CREATE TABLE IF NOT EXISTS enrolments (
	id          TEXT    PRIMARY KEY,
	spiffe_id   TEXT    NOT NULL,
	enrolled_ns INTEGER NOT NULL,
	revoked_ns  INTEGER
);
CREATE INDEX IF NOT EXISTS enrolments_spiffe_id ON enrolments(spiffe_id);
`

// Store is the SQLite-backed journal.
type Store struct {
	db *sql.DB
}

// OpenSQLite opens (creating if needed) the journal database at path. The
// file is owner-only. Writes are durable when they return: the database runs
// in WAL mode with synchronous=FULL.
func OpenSQLite(ctx context.Context, path string) (*Store, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	// Create the file owner-only before SQLite does, with its default mode.
	f, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	if err := f.Close(); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	q := url.Values{}
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "busy_timeout(10000)", "foreign_keys(ON)"} {
		q.Add("_pragma", p)
	}
	// Write transactions take the write lock at BEGIN, so two writers never
	// deadlock upgrading a read lock.
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("journal: open %s: %w", path, err)
	}
	if _, err := db.ExecContext(ctx, schema); err != nil {
		db.Close()
		return nil, fmt.Errorf("journal: create schema in %s: %w", path, err)
	}
	return &Store{db: db}, nil
}

// Close closes the database.
func (s *Store) Close() error { return s.db.Close() }

// Ping checks that the database answers.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.db.PingContext(ctx); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	return nil
}

// Redemption names the join token an issuance consumes. The token is marked
// used in the same transaction that records the issuance, so a token is spent
// exactly when a certificate is issued for it, and never twice.
type Redemption struct {
	TokenHash []byte
	TokenID   string
}

// RecordIssuance durably appends an issuance, redeeming a join token first
// when one is given. Nothing is written if any step fails.
func (s *Store) RecordIssuance(ctx context.Context, iss Issuance, redeem *Redemption) (int64, error) {
	iss.Time, iss.NotBefore, iss.NotAfter = iss.Time.UTC(), iss.NotBefore.UTC(), iss.NotAfter.UTC()
	body, err := encode(KindIssuance, iss)
	if err != nil {
		return 0, err
	}
	var seq int64
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		if redeem != nil {
			res, err := tx.ExecContext(ctx, `UPDATE join_tokens SET used_ns = ?
				WHERE token_hash = ? AND token_id = ? AND spiffe_id = ?
				AND used_ns IS NULL AND revoked_ns IS NULL AND expires_ns > ?`,
				iss.Time.UnixNano(), redeem.TokenHash, redeem.TokenID, iss.SPIFFEID, iss.Time.UnixNano())
			if err != nil {
				return err
			}
			if n, err := res.RowsAffected(); err != nil {
				return err
			} else if n != 1 {
				return ErrTokenSpent
			}
			if _, err := tx.ExecContext(ctx, `INSERT INTO enrolments (id, spiffe_id, enrolled_ns) VALUES (?, ?, ?)`,
				redeem.TokenID, iss.SPIFFEID, iss.Time.UnixNano()); err != nil {
				return err
			}
		}
		seq, err = insertEntry(ctx, tx, KindIssuance, iss.Time, iss.SPIFFEID, iss.Serial, body)
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("journal: record issuance of %s: %w", iss.Serial, err)
	}
	return seq, nil
}

// AppendRefusals appends refusal records in one transaction.
func (s *Store) AppendRefusals(ctx context.Context, refusals []Refusal) error {
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		for _, r := range refusals {
			r.First, r.Last = r.First.UTC(), r.Last.UTC()
			body, err := encode(KindRefusal, r)
			if err != nil {
				return err
			}
			if _, err := insertEntry(ctx, tx, KindRefusal, r.First, r.SPIFFEID, "", body); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
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
	err = s.inTx(ctx, func(tx *sql.Tx) error {
		if _, err := tx.ExecContext(ctx, `INSERT INTO join_tokens (token_hash, token_id, spiffe_id, created_ns, expires_ns)
			VALUES (?, ?, ?, ?, ?)`, hash, tok.ID, tok.SPIFFEID, tok.CreatedAt.UnixNano(), tok.ExpiresAt.UnixNano()); err != nil {
			return err
		}
		_, err := insertEntry(ctx, tx, KindJoinToken, rec.Time, rec.SPIFFEID, "", body)
		return err
	})
	if err != nil {
		return fmt.Errorf("journal: create join token: %w", err)
	}
	return nil
}

// LookupJoinToken returns the token with the given hash, or ErrNotFound.
func (s *Store) LookupJoinToken(ctx context.Context, hash []byte) (JoinToken, error) {
	var tok JoinToken
	var created, expires int64
	var used, revoked sql.NullInt64
	err := s.db.QueryRowContext(ctx, `SELECT token_id, spiffe_id, created_ns, expires_ns, used_ns, revoked_ns
		FROM join_tokens WHERE token_hash = ?`, hash).Scan(&tok.ID, &tok.SPIFFEID, &created, &expires, &used, &revoked)
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
	err := s.db.QueryRowContext(ctx, `SELECT spiffe_id, enrolled_ns, revoked_ns FROM enrolments WHERE id = ?`, id).
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

// Revoke revokes every standing enrolment of an identity and every unused
// join token bound to it, and records that it did. It returns the record.
func (s *Store) Revoke(ctx context.Context, spiffeID string, now time.Time) (Revocation, error) {
	rev := Revocation{Time: now.UTC(), SPIFFEID: spiffeID}
	err := s.inTx(ctx, func(tx *sql.Tx) error {
		res, err := tx.ExecContext(ctx, `UPDATE enrolments SET revoked_ns = ? WHERE spiffe_id = ? AND revoked_ns IS NULL`,
			now.UnixNano(), spiffeID)
		if err != nil {
			return err
		}
		n, err := res.RowsAffected()
		if err != nil {
			return err
		}
		rev.Enrolments = int(n)
		res, err = tx.ExecContext(ctx, `UPDATE join_tokens SET revoked_ns = ?
			WHERE spiffe_id = ? AND used_ns IS NULL AND revoked_ns IS NULL`, now.UnixNano(), spiffeID)
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
		_, err = insertEntry(ctx, tx, KindRevocation, rev.Time, spiffeID, "", body)
		return err
	})
	if err != nil {
		return Revocation{}, fmt.Errorf("journal: revoke %s: %w", spiffeID, err)
	}
	return rev, nil
}

// LookupIssuance returns the issuance of the certificate with the given serial
// (lower-case hex), or ErrNotFound.
func (s *Store) LookupIssuance(ctx context.Context, serial string) (Issuance, error) {
	var e Entry
	err := s.db.QueryRowContext(ctx, `SELECT seq, kind, body FROM entries WHERE serial = ? AND kind = ? ORDER BY seq LIMIT 1`,
		serial, string(KindIssuance)).Scan(&e.Seq, &e.Kind, &e.Body)
	if errors.Is(err, sql.ErrNoRows) {
		return Issuance{}, ErrNotFound
	}
	if err != nil {
		return Issuance{}, fmt.Errorf("journal: look up issuance %s: %w", serial, err)
	}
	rec, err := e.Decode()
	if err != nil {
		return Issuance{}, err
	}
	return *rec.(*Issuance), nil
}

// Entries returns up to limit entries with seq > after, in order.
func (s *Store) Entries(ctx context.Context, after int64, limit int) ([]Entry, error) {
	rows, err := s.db.QueryContext(ctx, `SELECT seq, kind, body FROM entries WHERE seq > ? ORDER BY seq LIMIT ?`, after, limit)
	if err != nil {
		return nil, fmt.Errorf("journal: list entries: %w", err)
	}
	defer rows.Close()
	var out []Entry
	for rows.Next() {
		var e Entry
		if err := rows.Scan(&e.Seq, &e.Kind, &e.Body); err != nil {
			return nil, fmt.Errorf("journal: list entries: %w", err)
		}
		out = append(out, e)
	}
	if err := rows.Err(); err != nil {
		return nil, fmt.Errorf("journal: list entries: %w", err)
	}
	return out, nil
}

// Meta returns a metadata value, or ErrNotFound.
func (s *Store) Meta(ctx context.Context, key string) (string, error) {
	var v string
	err := s.db.QueryRowContext(ctx, `SELECT value FROM meta WHERE key = ?`, key).Scan(&v)
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
	if _, err := s.db.ExecContext(ctx, `INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO NOTHING`, key, value); err != nil {
		return "", fmt.Errorf("journal: write %s: %w", key, err)
	}
	return s.Meta(ctx, key)
}

func (s *Store) inTx(ctx context.Context, fn func(*sql.Tx) error) error {
	tx, err := s.db.BeginTx(ctx, nil)
	if err != nil {
		return err
	}
	if err := fn(tx); err != nil {
		return errors.Join(err, tx.Rollback())
	}
	return tx.Commit()
}

func insertEntry(ctx context.Context, tx *sql.Tx, kind Kind, t time.Time, spiffeID, serial string, body []byte) (int64, error) {
	res, err := tx.ExecContext(ctx, `INSERT INTO entries (kind, time_ns, spiffe_id, serial, body) VALUES (?, ?, ?, ?, ?)`,
		string(kind), t.UnixNano(), spiffeID, serial, body)
	if err != nil {
		return 0, err
	}
	return res.LastInsertId()
}

func fromNanos(ns int64) time.Time { return time.Unix(0, ns).UTC() }

func fromNullNanos(n sql.NullInt64) time.Time {
	if !n.Valid {
		return time.Time{}
	}
	return fromNanos(n.Int64)
}
