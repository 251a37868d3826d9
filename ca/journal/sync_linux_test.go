package journal_test

import (
	"path/filepath"
	"testing"

	"modernc.org/sqlite"
)

// An SQLite journal commits with fdatasync(2), as SQLite's own Linux builds
// do, not with the transpiled library's default fsync(2).
func TestSQLiteCommitsWithFdatasync(t *testing.T) {
	backend{name: "sqlite", dsn: filepath.Join(t.TempDir(), "journal.db")}.open(t)
	if !sqlite.FdatasyncEnabled() {
		t.Fatal("after opening an SQLite journal, SQLite still commits with fsync")
	}
}
