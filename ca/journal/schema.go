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
CREATE INDEX IF NOT EXISTS entries_spiffe_id ON entries(spiffe_id, idx);
CREATE INDEX IF NOT EXISTS entries_time ON entries(time_ns);
CREATE TABLE IF NOT EXISTS checkpoints (
	size    BIGINT PRIMARY KEY,
	root    BYTEA  NOT NULL,
	note    BYTEA  NOT NULL,
	time_ns BIGINT NOT NULL
);
-- trustmesh_journal_append is a batch's whole commit in one statement, so
-- one round trip (commit.go, commitFast): it takes the append lock, and
-- only if the log still ends at expect (nobody appended since this
-- replica last looked) writes the rows and their signed checkpoint, in
-- the statement's own transaction. It returns whether it wrote. Being
-- VOLATILE plpgsql, each statement inside takes a new snapshot, so the
-- head is read after the lock is held and sees every row committed
-- before it (a single SQL statement's snapshot would predate the lock).
CREATE OR REPLACE FUNCTION trustmesh_journal_append(expect BIGINT,
	idxs BIGINT[], kinds TEXT[], times BIGINT[], ids TEXT[], serials TEXT[], bodies BYTEA[], leaves BYTEA[],
	cp_size BIGINT, cp_root BYTEA, cp_note BYTEA, cp_time BIGINT)
RETURNS BOOLEAN LANGUAGE plpgsql VOLATILE AS $fn$
DECLARE
	head BIGINT;
BEGIN
	PERFORM pg_advisory_xact_lock(7160321947);
	SELECT COALESCE(MAX(idx)+1, 0) INTO head FROM entries;
	IF head <> expect THEN
		RETURN FALSE;
	END IF;
	INSERT INTO entries (idx, kind, time_ns, spiffe_id, serial, body, leaf_hash)
		SELECT * FROM unnest(idxs, kinds, times, ids, serials, bodies, leaves);
	INSERT INTO checkpoints (size, root, note, time_ns) VALUES (cp_size, cp_root, cp_note, cp_time);
	RETURN TRUE;
END
$fn$;
`

// postgresAppendLock serialises appenders across replicas for the length of
// one transaction. The number is arbitrary and fixed; trustmesh_journal_append
// takes the same one.
const postgresAppendLock = `SELECT pg_advisory_xact_lock(7160321947)`

// postgresSchemaLock serialises schema creation across replicas starting at
// once.
const postgresSchemaLock = `SELECT pg_advisory_lock(7160321948)`
const postgresSchemaUnlock = `SELECT pg_advisory_unlock(7160321948)`
