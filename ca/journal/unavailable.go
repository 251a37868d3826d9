package journal

import (
	"context"
	"database/sql/driver"
	"errors"
	"fmt"
	"io"
	"net"
	"strings"

	"github.com/jackc/pgx/v5/pgconn"
	"modernc.org/sqlite"
	sqlite3 "modernc.org/sqlite/lib"
)

// ErrUnavailable marks an append that failed because the database could not
// be reached or could not write: the connection was refused or lost, the
// server is shutting down or out of resources, the disk is full, or the
// commit timed out. Nothing of the append was reported durable, so no
// certificate goes out with it; the same append may succeed once the
// database is back. Any other failure (a constraint violated, a corrupt
// file) is the journal's own and does not wrap ErrUnavailable.
var ErrUnavailable = errors.New("journal: the database is unavailable")

// unavailable wraps err in ErrUnavailable when it is a connection-level or
// resource failure of the database, and returns it unchanged otherwise.
func unavailable(err error) error {
	if err == nil || errors.Is(err, ErrUnavailable) || !databaseDown(err) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrUnavailable, err)
}

// databaseDown reports whether err says the database is out of reach or out
// of room, rather than that it refused what was written.
func databaseDown(err error) bool {
	if errors.Is(err, ErrTampered) || errors.Is(err, ErrTokenSpent) || errors.Is(err, context.Canceled) {
		return false
	}
	if errors.Is(err, context.DeadlineExceeded) || errors.Is(err, driver.ErrBadConn) ||
		errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, net.ErrClosed) ||
		errors.Is(err, pgconn.ErrConnClosed) || pgconn.Timeout(err) {
		return true
	}
	var connect *pgconn.ConnectError
	if errors.As(err, &connect) {
		return true
	}
	var netErr net.Error
	if errors.As(err, &netErr) {
		return true
	}
	var pg *pgconn.PgError
	if errors.As(err, &pg) {
		return postgresDown(pg.Code)
	}
	var lite *sqlite.Error
	if errors.As(err, &lite) {
		return sqliteDown(lite.Code())
	}
	return false
}

// postgresDown reports whether a SQLSTATE says the server cannot serve now:
// class 08 (connection exception), 53 (insufficient resources: disk full,
// out of memory, too many connections), 57P01-57P05 (shut down by an
// administrator or a crash, cannot connect now, idle session timeout), 58
// (system error such as an I/O error), and 25006 (read-only transaction: a
// standby that has not been promoted yet). Constraint violations (class 23)
// and every other code are the journal's own failures.
func postgresDown(code string) bool {
	switch {
	case strings.HasPrefix(code, "08"), strings.HasPrefix(code, "53"), strings.HasPrefix(code, "58"):
		return true
	case code == "57P01", code == "57P02", code == "57P03", code == "57P04", code == "57P05":
		return true
	case code == "25006":
		return true
	}
	return false
}

// sqliteDown reports whether an SQLite result code (primary or extended)
// says the file cannot be written now: the disk is full, an I/O error, the
// file cannot be opened, the lock is held past busy_timeout, or memory ran
// out. SQLITE_CONSTRAINT, SQLITE_CORRUPT and the rest are not.
func sqliteDown(code int) bool {
	switch code & 0xff {
	case sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR, sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_BUSY,
		sqlite3.SQLITE_NOMEM, sqlite3.SQLITE_READONLY:
		return true
	}
	return false
}
