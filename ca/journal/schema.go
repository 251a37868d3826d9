package journal

// The two dialects differ only in their DDL and in how an appender takes the
// log's write lock; every query is written once, with $N placeholders, which
// both SQLite and PostgreSQL accept, except the multi-row insert of entries,
// which SQLite gets with ? placeholders (stmt.go).

const sqliteSchema = `
CREATE TABLE IF NOT EXISTS meta (
	key   TEXT PRIMARY KEY,
	value TEXT NOT NULL
);
-- entries is the append-only log. idx is the Merkle leaf index; body holds
-- the exact bytes of the leaf; leaf_hash is its RFC 6962 hash as written,
-- which lets verification point at a row whose body changed.
CREATE TABLE IF NOT EXISTS entries (
	idx       INTEGER PRIMARY KEY,
	kind      TEXT    NOT NULL,
	time_ns   INTEGER NOT NULL,
	spiffe_id TEXT    NOT NULL DEFAULT '',
	serial    TEXT    NOT NULL DEFAULT '',
	body      BLOB    NOT NULL,
	leaf_hash BLOB    NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_serial ON entries(serial) WHERE serial != '';
CREATE INDEX IF NOT EXISTS entries_time ON entries(time_ns);
-- No query reads entries by SPIFFE ID: the ledger and the audit read the
-- log in order. An index on it put each entry of a commit on an index page
-- of its own (its workload's place in the index), a page written to the
-- log per entry; journals from before lose it.
DROP INDEX IF EXISTS entries_spiffe_id;
-- checkpoints are signed notes over the log's first size entries, one per
-- commit batch.
--
-- Join tokens, enrolments and revocations have no tables: their state is
-- derived from the verified entries alone (ledger.go), so that no row
-- beside the log can vouch for a token or clear a revocation. Databases
-- from before keep their join_tokens and enrolments tables; nothing reads
-- them.
CREATE TABLE IF NOT EXISTS checkpoints (
	size    INTEGER PRIMARY KEY,
	root    BLOB    NOT NULL,
	note    BLOB    NOT NULL,
	time_ns INTEGER NOT NULL
);
`

const postgresSchema = `
CREATE TABLE IF NOT EXISTS meta (
	key   TEXT PRIMARY KEY,
	value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS entries (
	idx       BIGINT PRIMARY KEY,
	kind      TEXT   NOT NULL,
	time_ns   BIGINT NOT NULL,
	spiffe_id TEXT   NOT NULL DEFAULT '',
	serial    TEXT   NOT NULL DEFAULT '',
	body      BYTEA  NOT NULL,
	leaf_hash BYTEA  NOT NULL
);
CREATE INDEX IF NOT EXISTS entries_serial ON entries(serial) WHERE serial != '';
CREATE INDEX IF NOT EXISTS entries_time ON entries(time_ns);
DROP INDEX IF EXISTS entries_spiffe_id;
CREATE TABLE IF NOT EXISTS checkpoints (
	size    BIGINT PRIMARY KEY,
	root    BYTEA  NOT NULL,
	note    BYTEA  NOT NULL,
	time_ns BIGINT NOT NULL
);
`

// postgresAppendLock serialises appenders across replicas for the length of
// one transaction. The number is arbitrary and fixed.
const postgresAppendLock = `SELECT pg_advisory_xact_lock(7160321947)`

// postgresSchemaLock serialises schema creation across replicas starting at
// once.
const postgresSchemaLock = `SELECT pg_advisory_lock(7160321948)`
const postgresSchemaUnlock = `SELECT pg_advisory_unlock(7160321948)`
