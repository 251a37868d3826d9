package journal

import (
	"context"
	"database/sql"
	"fmt"
	"strings"
)

// statements are the queries on the hot paths: the commit of every batch,
// and the lookups every renewal makes. They are prepared once on the pool;
// database/sql then prepares each once per connection and reuses it, so
// that no commit or renewal parses SQL. (The embedded SQLite parses in Go;
// parsing was a quarter of a commit's CPU.)
type statements struct {
	nextIndex, maxCheckpoint, insertCheckpoint *sql.Stmt
	// insertEntries[k] inserts 1<<k entries in one statement: a batch's
	// rows go in as few statements (and, on PostgreSQL, round trips) as the
	// binary digits of their count.
	insertEntries [insertSizes]*sql.Stmt
	entryBySerial *sql.Stmt
}

// insertSizes is how many multi-row insert statements are prepared: the
// largest inserts 1<<(insertSizes-1) = 64 rows, 448 parameters, far under
// both SQLite's and PostgreSQL's limits.
const insertSizes = 7

// entryColumns is how many values one entry row binds.
const entryColumns = 7

// insertEntriesQueries[k] is the INSERT of 1<<k entry rows: prepared on
// the pool (prepare), and queued by text in the PostgreSQL pipeline
// (pipeline.go), where pgx caches it per connection.
// sqliteInsertEntriesQueries are the same with anonymous placeholders: the
// SQLite driver looks up the name of every named placeholder at every bind
// (sqlite3_bind_parameter_name, then parsing "$N"), for each of the seven
// values of each row; an anonymous one binds by position at once.
var insertEntriesQueries, sqliteInsertEntriesQueries = insertQueries(false), insertQueries(true)

func insertQueries(anonymous bool) (q [insertSizes]string) {
	for k := range q {
		q[k] = insertEntriesQuery(1<<k, anonymous)
	}
	return q
}

// insertEntriesQuery is the INSERT of n entry rows, with $N placeholders,
// or ? ones when anonymous (SQLite only).
func insertEntriesQuery(n int, anonymous bool) string {
	var b strings.Builder
	b.WriteString(`INSERT INTO entries (idx, kind, time_ns, spiffe_id, serial, body, leaf_hash) VALUES `)
	for r := range n {
		if r > 0 {
			b.WriteByte(',')
		}
		b.WriteByte('(')
		for c := range entryColumns {
			if c > 0 {
				b.WriteByte(',')
			}
			if anonymous {
				b.WriteByte('?')
			} else {
				fmt.Fprintf(&b, "$%d", r*entryColumns+c+1)
			}
		}
		b.WriteByte(')')
	}
	return b.String()
}

// The other statements a commit runs, by text: prepared on the pool and
// queued in the PostgreSQL pipeline alike.
const (
	nextIndexQuery        = `SELECT COALESCE(MAX(idx)+1, 0) FROM entries`
	insertCheckpointQuery = `INSERT INTO checkpoints (size, root, note, time_ns) VALUES ($1, $2, $3, $4)`
)

// prepare prepares the hot statements. It runs at Open, once the schema
// exists.
func (s *Store) prepare(ctx context.Context) error {
	type prep struct {
		dst   **sql.Stmt
		query string
	}
	preps := []prep{
		{&s.stmts.nextIndex, nextIndexQuery},
		{&s.stmts.maxCheckpoint, maxCheckpointQuery},
		{&s.stmts.insertCheckpoint, insertCheckpointQuery},
		{&s.stmts.entryBySerial, `SELECT idx, kind, body FROM entries
			WHERE serial = $1 AND serial != '' AND kind = $2 ORDER BY idx LIMIT 1`},
	}
	inserts := insertEntriesQueries
	if !s.postgres {
		inserts = sqliteInsertEntriesQueries
	}
	for k := range s.stmts.insertEntries {
		preps = append(preps, prep{&s.stmts.insertEntries[k], inserts[k]})
	}
	for _, p := range preps {
		st, err := s.db.PrepareContext(ctx, p.query)
		if err != nil {
			s.stmts.close()
			return fmt.Errorf("journal: prepare: %w", err)
		}
		*p.dst = st
	}
	return nil
}

func (st *statements) close() {
	all := append([]*sql.Stmt{st.nextIndex, st.maxCheckpoint, st.insertCheckpoint, st.entryBySerial}, st.insertEntries[:]...)
	for _, s := range all {
		if s != nil {
			s.Close()
		}
	}
}

// rows are entry rows appended to the in-memory log and not yet written:
// the committer buffers a batch's rows and writes them with flush.
type rows struct {
	args []any // entryColumns values per row
}

func (r *rows) add(idx uint64, e pending, leaf []byte) {
	r.args = append(r.args, int64(idx), string(e.kind), e.time.UnixNano(), e.spiffeID, e.serial, e.body, leaf)
}

func (r *rows) len() int { return len(r.args) / entryColumns }

// flush writes the buffered rows in tx, largest statements first, and
// empties the buffer whatever the outcome.
func (s *Store) flush(ctx context.Context, tx *sql.Tx, r *rows) error {
	defer r.reset()
	return r.chunks(func(k int, vals []any) error {
		if _, err := tx.StmtContext(ctx, s.stmts.insertEntries[k]).ExecContext(ctx, vals...); err != nil {
			return fmt.Errorf("journal: append: %w", err)
		}
		return nil
	})
}

func (r *rows) reset() {
	clear(r.args)
	r.args = r.args[:0]
}

// chunks splits the buffered rows over the multi-row inserts, largest
// first: f gets k, the insert of 1<<k rows (insertEntriesQueries[k]), and
// its values. Every row goes to exactly one chunk.
func (r *rows) chunks(f func(k int, vals []any) error) error {
	args := r.args
	for k := insertSizes - 1; k >= 0 && len(args) > 0; {
		n := 1 << k
		if len(args) < n*entryColumns {
			k--
			continue
		}
		if err := f(k, args[:n*entryColumns]); err != nil {
			return err
		}
		args = args[n*entryColumns:]
	}
	if len(args) > 0 {
		// Never sign a checkpoint over rows that were not written.
		return fmt.Errorf("journal: append: %d values of a row left unwritten", len(args))
	}
	return nil
}
