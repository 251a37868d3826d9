package journal

import (
	"context"
	"database/sql"
	"errors"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/stdlib" // also registers PostgreSQL as "pgx"
	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
	"k8s.io/utils/clock"
	"modernc.org/sqlite" // the embedded SQLite driver, registered as "sqlite"
)

var (
	// ErrTokenSpent is returned when an issuance tries to redeem a join token
	// that has been used, revoked or has expired since it was authenticated.
	ErrTokenSpent = errors.New("journal: join token already used, revoked or expired")
	// ErrClosed is returned for appends after Close.
	ErrClosed = errors.New("journal: closed")
	// ErrTampered is returned when the stored log no longer matches what was
	// appended: it shrank, or it disagrees with its latest checkpoint. The
	// journal then refuses every append, so that no new checkpoint ever
	// vouches for altered history.
	ErrTampered = errors.New("journal: the log does not match its checkpoints")
)

// Config configures a Store.
type Config struct {
	// DSN is a PostgreSQL URL (postgres://…) or the path of an SQLite file.
	DSN string
	// Existing opens an SQLite journal only if its file exists: neither the
	// file nor its directory is created. Operator commands set it.
	Existing bool
	// Origin names the log in its checkpoints, e.g. "trustmesh.journal/cluster.local".
	Origin string
	// Signer signs checkpoints. It is separate from the CA key. Nil opens
	// the journal read-only: appends fail.
	Signer note.Signer
	// VerifierKey is the signer's public key (note's "name+hash+key" form).
	// With it, the stored log is checked against its latest signed
	// checkpoint at Open and whenever rows written elsewhere are caught up.
	VerifierKey string
	// Witness, when set, receives every new signed checkpoint.
	Witness Witness
	// MaxBatch bounds how many appends share one commit. Default 512.
	MaxBatch int
	// CommitDelay is how long a batch may be held open for more appends
	// under concurrent load, so that they share one fsync and one
	// checkpoint. Zero means DefaultCommitDelay; negative disables it.
	CommitDelay time.Duration
	// CommitSiblings is how many appends the previous batch must have
	// held for the next to wait: a lone caller never waits. Zero or less
	// means DefaultCommitSiblings.
	CommitSiblings int
	// Clock times CommitDelay and RecheckInterval; nil means the real
	// clock.
	Clock clock.Clock
	// RecheckInterval is how often Watch re-reads every stored entry and
	// compares it with the verified leaf at its index. Zero means
	// DefaultRecheckInterval.
	RecheckInterval time.Duration
	// LatestRefresh is how long LatestIssuanceTime serves the newest
	// issuance time from memory before it reads the database again. Zero
	// means DefaultLatestRefresh.
	LatestRefresh time.Duration

	Log *slog.Logger
}

// Store is the journal: an append-only Merkle log of entries in SQLite or
// PostgreSQL, with the enrolment state that renewals check. Appends from
// concurrent callers are grouped into one transaction and one durable commit,
// after which a signed checkpoint is published; each caller returns only
// once its entry is durable.
type Store struct {
	cfg      Config
	db       *sql.DB
	postgres bool
	hasher   compactHasher

	ops    chan *op
	closed chan struct{}
	// closeMu orders Close after any enqueue in progress (enqueue).
	closeMu sync.RWMutex
	wg      sync.WaitGroup
	// stmts are the prepared hot statements (stmt.go).
	stmts statements
	// wal, for SQLite, lets a lookup skip reading the log's size when no
	// commit came since the last read (walindex.go); nil otherwise.
	wal *walIndex
	// sizeReads counts the lookups that read the log's size (tests).
	sizeReads atomic.Int64

	// Committer state: the compact range of the whole log, and the size
	// and end of the last batch. Only the committer goroutine touches them
	// after Open.
	rng        *compact.Range
	writer     *sql.Conn
	lastBatch  int
	lastCommit time.Time
	// recheck is set once a commit failed with ErrUnavailable: the next
	// commit checks the stored log against its latest signed checkpoint
	// before it appends.
	recheck bool
	// integrity is why the stored log cannot be trusted; once set it blocks
	// every append and every lookup. Audits still work.
	imu       sync.Mutex
	integrity error
	verifier  note.Verifier
	// ledger holds the verified leaves and the state lookups read.
	ledger *ledger
	// unproven is set when entries were loaded without a verifier key:
	// nothing vouches for them, so lookups refuse.
	unproven bool
	// metrics are the append latency and batch size (metrics.go).
	metrics metrics
	// latest is the newest issuance time, kept for the clock guard
	// (latest.go).
	latest latestCache
}

func (s *Store) setIntegrity(err error) {
	s.imu.Lock()
	defer s.imu.Unlock()
	if s.integrity == nil {
		s.integrity = err
		s.cfg.Log.Error("the journal does not match its signed checkpoints: refusing every lookup, issuance and checkpoint; run trustmesh audit verify", "error", err)
	}
}

type compactHasher struct{ f compact.RangeFactory }

func newHasher() compactHasher {
	return compactHasher{f: compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}}
}

// Open opens (creating if needed) the journal and rebuilds its Merkle state.
// A log that does not match its latest checkpoint can still be read and
// audited, but Integrity reports it and every append fails.
func Open(ctx context.Context, cfg Config) (*Store, error) {
	if cfg.MaxBatch <= 0 {
		cfg.MaxBatch = 512
	}
	if cfg.CommitDelay == 0 {
		cfg.CommitDelay = DefaultCommitDelay
	}
	if cfg.CommitSiblings <= 0 {
		cfg.CommitSiblings = DefaultCommitSiblings
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.RecheckInterval <= 0 {
		cfg.RecheckInterval = DefaultRecheckInterval
	}
	if cfg.LatestRefresh <= 0 {
		cfg.LatestRefresh = DefaultLatestRefresh
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.Origin == "" && cfg.Signer != nil {
		cfg.Origin = cfg.Signer.Name()
	}
	s := &Store{cfg: cfg, hasher: newHasher(), ops: make(chan *op, 4096), closed: make(chan struct{}), metrics: newMetrics()}
	var err error
	if isPostgres(cfg.DSN) {
		s.postgres = true
		s.db, err = openPostgres(cfg.DSN)
	} else {
		s.db, err = openSQLite(cfg.DSN, cfg.Existing)
	}
	if err != nil {
		return nil, err
	}
	// Renewals read the journal concurrently (issuances, enrolments): keep
	// their connections open rather than reopening one per read, which for
	// SQLite also means re-applying every pragma.
	s.db.SetMaxOpenConns(32)
	s.db.SetMaxIdleConns(32)
	if err := s.createSchema(ctx); err != nil {
		s.db.Close()
		return nil, err
	}
	if err := s.prepare(ctx); err != nil {
		s.db.Close()
		return nil, err
	}
	if !s.postgres {
		if s.wal, err = openWALIndex(ctx, s.db, cfg.DSN); err != nil {
			cfg.Log.Info("lookups read the journal's size every time: its wal-index cannot be read", "error", err)
		}
	}
	s.rng = s.hasher.f.NewEmptyRange(0)
	s.ledger = newLedger()
	if cfg.VerifierKey != "" {
		if s.verifier, err = note.NewVerifier(cfg.VerifierKey); err != nil {
			s.closeDB()
			return nil, fmt.Errorf("journal: checkpoint key: %w", err)
		}
	}
	if err := s.load(ctx); err != nil {
		s.closeDB()
		return nil, err
	}
	s.wg.Add(1)
	go s.commitLoop()
	return s, nil
}

// OpenSQLite opens a journal in an SQLite file, read-only as to appends
// unless a signer is configured; it is Open with a path.
func OpenSQLite(ctx context.Context, path string) (*Store, error) {
	return Open(ctx, Config{DSN: path})
}

func isPostgres(dsn string) bool {
	return strings.HasPrefix(dsn, "postgres://") || strings.HasPrefix(dsn, "postgresql://")
}

// IdleInTransactionTimeout is how long PostgreSQL lets one of the
// journal's sessions sit idle inside a transaction before it ends the
// session. The committer holds the append lock (pg_advisory_xact_lock) for
// one transaction of back-to-back statements, so it never idles that long.
// A replica that dies releases the lock at once, as its session closes; one
// cut off from the database (a partition, a frozen VM) would otherwise hold
// it until TCP gives up, hours later, and every other replica would stop
// issuing with it. A DSN that sets idle_in_transaction_session_timeout
// keeps its own.
const IdleInTransactionTimeout = 10 * time.Second

func openPostgres(dsn string) (*sql.DB, error) {
	cfg, err := pgx.ParseConfig(dsn)
	if err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	if _, ok := cfg.RuntimeParams["idle_in_transaction_session_timeout"]; !ok {
		cfg.RuntimeParams["idle_in_transaction_session_timeout"] = fmt.Sprint(IdleInTransactionTimeout.Milliseconds())
	}
	return stdlib.OpenDB(*cfg), nil
}

// syncData makes SQLite commit with fdatasync(2) instead of fsync(2), for
// the whole process, once. fdatasync writes a file's data and whatever is
// needed to read it back, its size included, but not its timestamps, so a
// commit is as durable. SQLite's own builds use it wherever it exists; the
// transpiled library keeps the source's default, fsync, unless told. On
// this project's 2-core test machine (ext4) it shortened a commit's sync
// under ca-load at c=16 by about 4% and raised the renewal rate by a median
// 2.8% over eight paired rounds. Where fdatasync does not exist (macOS,
// Windows) SQLite keeps fsync.
var syncData = sync.OnceFunc(func() {
	_, _ = sqlite.Fdatasync(true) // ErrFdatasyncUnavailable: fsync stays
})

func openSQLite(path string, existing bool) (*sql.DB, error) {
	syncData()
	q := url.Values{}
	if existing {
		// SQLite itself must not create the file either.
		q.Set("mode", "rw")
		if _, err := os.Stat(path); err != nil {
			return nil, fmt.Errorf("journal: %w", err)
		}
	} else {
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
	}
	// temp_store(MEMORY): a multi-row INSERT keeps a statement journal of
	// the pages it changes, so that a failed row can be undone alone; past
	// 64 KiB SQLite spills it to a temporary file, a write system call per
	// page, which a commit of a dozen entries reaches. In memory it is
	// bounded by the pages one INSERT changes: 64 rows (stmt.go) and their
	// index entries, under a megabyte.
	for _, p := range []string{"journal_mode(WAL)", "synchronous(FULL)", "busy_timeout(10000)", "foreign_keys(ON)", "temp_store(MEMORY)"} {
		q.Add("_pragma", p)
	}
	// Write transactions take the write lock at BEGIN: this is what
	// serialises appenders, across processes too.
	q.Set("_txlock", "immediate")
	db, err := sql.Open("sqlite", "file:"+path+"?"+q.Encode())
	if err != nil {
		return nil, fmt.Errorf("journal: open %s: %w", path, err)
	}
	return db, nil
}

func (s *Store) createSchema(ctx context.Context) error {
	if !s.postgres {
		if _, err := s.db.ExecContext(ctx, sqliteSchema); err != nil {
			return fmt.Errorf("journal: create schema: %w", err)
		}
		return nil
	}
	conn, err := s.db.Conn(ctx)
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer conn.Close()
	if _, err := conn.ExecContext(ctx, postgresSchemaLock); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer conn.ExecContext(context.WithoutCancel(ctx), postgresSchemaUnlock) //nolint:errcheck
	if _, err := conn.ExecContext(ctx, postgresSchema); err != nil {
		return fmt.Errorf("journal: create schema: %w", err)
	}
	return nil
}

// SetSigner sets the checkpoint signer and its verifier key, enabling
// appends, and checks the stored log against its latest signed checkpoint.
// Call it before the first append.
func (s *Store) SetSigner(ctx context.Context, signer note.Signer, vkey string) error {
	v, err := note.NewVerifier(vkey)
	if err != nil {
		return fmt.Errorf("journal: checkpoint key: %w", err)
	}
	s.cfg.Signer, s.verifier = signer, v
	if s.cfg.Origin == "" {
		s.cfg.Origin = signer.Name()
	}
	s.rng = s.hasher.f.NewEmptyRange(0)
	s.ledger = newLedger()
	s.imu.Lock()
	s.integrity = nil
	s.imu.Unlock()
	return s.load(ctx)
}

// load rebuilds the tree from one consistent read of the log and, when the
// verifier is known, checks it against the latest signed checkpoint.
// Tampering is recorded in integrity rather than returned.
func (s *Store) load(ctx context.Context) error {
	tx, err := s.db.BeginTx(ctx, &sql.TxOptions{ReadOnly: s.postgres, Isolation: s.snapshotIsolation()})
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer tx.Rollback() //nolint:errcheck // read only
	err = s.catchUp(ctx, tx)
	if err == nil && s.verifier != nil {
		err = s.checkLatest(ctx, tx)
	}
	if errors.Is(err, ErrTampered) {
		s.setIntegrity(err)
		return nil
	}
	if err != nil {
		return err
	}
	// Entries count for lookups once the signed checkpoint vouches for
	// them. Without a verifier key nothing does: a store that appends then
	// vouches for its own entries only if it started from an empty log.
	s.unproven = s.verifier == nil && s.rng.End() > 0
	s.ledger.publish()
	return nil
}

func (s *Store) snapshotIsolation() sql.IsolationLevel {
	if s.postgres {
		return sql.LevelRepeatableRead
	}
	return sql.LevelDefault
}

// Close stops accepting appends, finishes those in flight and closes the
// database.
func (s *Store) Close() error {
	s.closeMu.Lock()
	select {
	case <-s.closed:
		s.closeMu.Unlock()
		return nil
	default:
	}
	close(s.closed)
	s.closeMu.Unlock()
	s.wg.Wait()
	return s.closeDB()
}

// closeDB closes the prepared statements, the wal-index and the database.
func (s *Store) closeDB() error {
	s.stmts.close()
	var werr error
	if s.wal != nil {
		werr = s.wal.close()
	}
	return errors.Join(s.db.Close(), werr)
}

// Integrity returns nil when the stored log matched its latest checkpoint at
// Open, and otherwise why not (wrapping ErrTampered).
func (s *Store) Integrity() error {
	s.imu.Lock()
	defer s.imu.Unlock()
	return s.integrity
}

// Ping checks that the database answers.
func (s *Store) Ping(ctx context.Context) error {
	if err := s.db.PingContext(ctx); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	return nil
}

// Size returns the number of entries in the log as the committer knows it.
func (s *Store) Size(ctx context.Context) (uint64, error) {
	var n int64
	if err := s.db.QueryRowContext(ctx, `SELECT COALESCE(MAX(idx)+1, 0) FROM entries`).Scan(&n); err != nil {
		return 0, fmt.Errorf("journal: %w", err)
	}
	return uint64(n), nil
}

// querier is what catch-up reads through: a transaction.
type querier interface {
	QueryContext(ctx context.Context, query string, args ...any) (*sql.Rows, error)
	QueryRowContext(ctx context.Context, query string, args ...any) *sql.Row
	StmtContext(ctx context.Context, stmt *sql.Stmt) *sql.Stmt
}

// catchUp extends the in-memory range with entries appended by others (other
// replicas, or the CLI in another process). The log may only grow.
func (s *Store) catchUp(ctx context.Context, q querier) error {
	// The primary key's maximum, not COUNT(*): this runs on every commit
	// batch and must not scan the log. Rows missing below it are found by
	// the read that follows (when new) or by audit verify.
	var n int64
	if err := q.StmtContext(ctx, s.stmts.nextIndex).QueryRowContext(ctx).Scan(&n); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if uint64(n) <= s.rng.End() {
		return s.extend(n, nil)
	}
	rows, err := q.QueryContext(ctx, entriesFromQuery, int64(s.rng.End()))
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	defer rows.Close()
	return s.extend(n, rows)
}

// entriesFromQuery reads the rows a catch-up appends.
const entriesFromQuery = `SELECT idx, body FROM entries WHERE idx >= $1 ORDER BY idx`

// entryRows are the rows of entriesFromQuery, from database/sql or pgx.
type entryRows interface {
	Next() bool
	Scan(dest ...any) error
	Err() error
}

// extend appends to the in-memory range the rows that take the log from its
// size to n, as read by entriesFromQuery from that size on; rows is only
// read when n is larger. The log may only grow, without gaps.
func (s *Store) extend(n int64, rows entryRows) error {
	have := s.rng.End()
	switch {
	case n >= 0 && uint64(n) == have:
		return nil
	case n < 0 || uint64(n) < have:
		return fmt.Errorf("%w: it holds %d entries, %d were appended", ErrTampered, n, have)
	}
	next := have
	for rows.Next() {
		var idx int64
		var body []byte
		if err := rows.Scan(&idx, &body); err != nil {
			return fmt.Errorf("journal: %w", err)
		}
		if uint64(idx) != next {
			return fmt.Errorf("%w: entry %d is missing", ErrTampered, next)
		}
		leaf := rfc6962.DefaultHasher.HashLeaf(body)
		if err := s.rng.Append(leaf, nil); err != nil {
			return fmt.Errorf("journal: %w", err)
		}
		// Unpublished until the caller has checked the new root against
		// the latest signed checkpoint.
		if err := s.ledger.add(next, leaf, body); err != nil {
			return fmt.Errorf("%w: %v", ErrTampered, err)
		}
		next++
	}
	if err := rows.Err(); err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if next != uint64(n) {
		return fmt.Errorf("%w: entry %d is missing", ErrTampered, next)
	}
	return nil
}

// checkLatest compares the rebuilt log with its latest checkpoint, as
// signed: the size and root in the signed note, never the unsigned columns
// beside it. A log with entries but no valid checkpoint fails.
func (s *Store) checkLatest(ctx context.Context, q querier) error {
	var size int64
	var signed []byte
	err := q.QueryRowContext(ctx, latestCheckpointQuery).Scan(&size, &signed)
	if errors.Is(err, sql.ErrNoRows) {
		return s.checkSigned(nil, false)
	}
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	return s.checkSigned(signed, true)
}

// latestCheckpointQuery reads the latest stored checkpoint.
const latestCheckpointQuery = `SELECT size, note FROM checkpoints ORDER BY size DESC LIMIT 1`

// maxCheckpointQuery reads the largest stored checkpoint's size (0 when
// there is none): a commit reads it under the append lock, before it signs.
const maxCheckpointQuery = `SELECT COALESCE(MAX(size), 0) FROM checkpoints`

// checkpointBeyond refuses a checkpoint row at a size beyond the n entries
// the log holds. Only the committer holding the append lock writes a
// checkpoint, and only over rows it wrote in the same transaction, so such
// a row was put there behind the journal's back. Left alone, the commit
// would sign a tree of that size and then fail on the row's primary key
// after its note had been sent, and the next commit would sign a different
// tree of the same size: the checkpoint key would equivocate. It is
// checked before anything is signed.
func checkpointBeyond(maxSize, n int64) error {
	if maxSize > n {
		return fmt.Errorf("%w: a checkpoint row at size %d is beyond the log's %d entries", ErrTampered, maxSize, n)
	}
	return nil
}

// checkSigned compares the in-memory log with the latest stored checkpoint's
// signed note; found is false when there is none.
func (s *Store) checkSigned(signed []byte, found bool) error {
	if !found {
		if s.rng.End() == 0 {
			return nil
		}
		return fmt.Errorf("%w: %d entries and no checkpoint", ErrTampered, s.rng.End())
	}
	n, err := note.Open(signed, note.VerifierList(s.verifier))
	if err != nil {
		return fmt.Errorf("%w: the latest checkpoint is not validly signed: %v", ErrTampered, err)
	}
	cp, err := parseCheckpointText(n.Text, s.verifier.Name())
	if err != nil {
		return fmt.Errorf("%w: %v", ErrTampered, err)
	}
	if cp.Size != s.rng.End() {
		return fmt.Errorf("%w: the latest signed checkpoint is at size %d, the log holds %d", ErrTampered, cp.Size, s.rng.End())
	}
	got, err := s.rng.GetRootHash(nil)
	if err != nil {
		return fmt.Errorf("journal: %w", err)
	}
	if string(got) != string(cp.Root) {
		return fmt.Errorf("%w: the root of %d entries differs from the latest signed checkpoint", ErrTampered, cp.Size)
	}
	return nil
}

func fromNanos(ns int64) time.Time { return time.Unix(0, ns).UTC() }

func fromNullNanos(n sql.NullInt64) time.Time {
	if !n.Valid {
		return time.Time{}
	}
	return fromNanos(n.Int64)
}
