package journal

// The two dialects differ only in their DDL and in how an appender takes the
// log's write lock; every query is written once, with $N placeholders, which
// both SQLite and PostgreSQL accept.

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
CREATE INDEX IF NOT EXISTS entries_spiffe_id ON entries(spiffe_id, idx);
CREATE INDEX IF NOT EXISTS entries_time ON entries(time_ns);
-- checkpoints are signed notes over the log's first size entries, one per
-- commit batch.
CREATE TABLE IF NOT EXISTS checkpoints (
	size    INTEGER PRIMARY KEY,
	root    BLOB    NOT NULL,
	note    BLOB    NOT NULL,
	time_ns INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS join_tokens (
	token_hash BLOB    PRIMARY KEY,
	token_id   TEXT    NOT NULL UNIQUE,
	spiffe_id  TEXT    NOT NULL,
	created_ns INTEGER NOT NULL,
	expires_ns INTEGER NOT NULL,
	used_ns    INTEGER,
	revoked_ns INTEGER
);
CREATE TABLE IF NOT EXISTS enrolments (
	id          TEXT    PRIMARY KEY,
	spiffe_id   TEXT    NOT NULL,
	enrolled_ns INTEGER NOT NULL,
	revoked_ns  INTEGER
);
CREATE INDEX IF NOT EXISTS enrolments_spiffe_id ON enrolments(spiffe_id);
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
CREATE INDEX IF NOT EXISTS entries_spiffe_id ON entries(spiffe_id, idx);
CREATE INDEX IF NOT EXISTS entries_time ON entries(time_ns);
CREATE TABLE IF NOT EXISTS checkpoints (
	size    BIGINT PRIMARY KEY,
	root    BYTEA  NOT NULL,
	note    BYTEA  NOT NULL,
	time_ns BIGINT NOT NULL
);
CREATE TABLE IF NOT EXISTS join_tokens (
	token_hash BYTEA  PRIMARY KEY,
	token_id   TEXT   NOT NULL UNIQUE,
	spiffe_id  TEXT   NOT NULL,
	created_ns BIGINT NOT NULL,
	expires_ns BIGINT NOT NULL,
	used_ns    BIGINT,
	revoked_ns BIGINT
);
CREATE TABLE IF NOT EXISTS enrolments (
	id          TEXT   PRIMARY KEY,
	spiffe_id   TEXT   NOT NULL,
	enrolled_ns BIGINT NOT NULL,
	revoked_ns  BIGINT
);
CREATE INDEX IF NOT EXISTS enrolments_spiffe_id ON enrolments(spiffe_id);
`

// postgresAppendLock serialises appenders across replicas for the length of
// one transaction. The number is arbitrary and fixed.
const postgresAppendLock = `SELECT pg_advisory_xact_lock(7160321947)`

// postgresSchemaLock serialises schema creation across replicas starting at
// once.
const postgresSchemaLock = `SELECT pg_advisory_lock(7160321948)`
const postgresSchemaUnlock = `SELECT pg_advisory_unlock(7160321948)`
