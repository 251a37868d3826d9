package journal

import (
	"context"
	"database/sql"
	"fmt"
)

// statements are the queries on the hot paths: the commit of every batch,
// and the lookups every renewal makes. They are prepared once on the pool;
// database/sql then prepares each once per connection and reuses it, so
// that no commit or renewal parses SQL. (The embedded SQLite parses in Go;
// parsing was a quarter of a commit's CPU.)
type statements struct {
	nextIndex, insertEntry, insertCheckpoint *sql.Stmt
	entryBySerial                            *sql.Stmt
}

// prepare prepares the hot statements. It runs at Open, once the schema
// exists.
func (s *Store) prepare(ctx context.Context) error {
	for _, p := range []struct {
		dst   **sql.Stmt
		query string
	}{
		{&s.stmts.nextIndex, `SELECT COALESCE(MAX(idx)+1, 0) FROM entries`},
		{&s.stmts.insertEntry, `INSERT INTO entries (idx, kind, time_ns, spiffe_id, serial, body, leaf_hash)
			VALUES ($1, $2, $3, $4, $5, $6, $7)`},
		{&s.stmts.insertCheckpoint, `INSERT INTO checkpoints (size, root, note, time_ns) VALUES ($1, $2, $3, $4)`},
		{&s.stmts.entryBySerial, `SELECT idx, kind, body FROM entries
			WHERE serial = $1 AND serial != '' AND kind = $2 ORDER BY idx LIMIT 1`},
	} {
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
	for _, s := range []*sql.Stmt{st.nextIndex, st.insertEntry, st.insertCheckpoint, st.entryBySerial} {
		if s != nil {
			s.Close()
		}
	}
}
