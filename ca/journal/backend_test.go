package journal_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/hex"
	"net/url"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/mod/sumdb/note"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// postgresEnv names the PostgreSQL server the test script starts on
// loopback (hack/postgres.sh); each test gets a database of its own there.
const postgresEnv = "TRUSTMESH_TEST_POSTGRES_DSN"

// backend is one place a journal can live.
type backend struct {
	name string
	dsn  string
}

var testSigner, testVKey = func() (note.Signer, string) {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	s, v, err := journal.NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		panic(err)
	}
	return s, v
}()

// backends returns a fresh SQLite file and, when the test script provides a
// server, a fresh PostgreSQL database. In CI the PostgreSQL one is required.
func backends(t testing.TB) []backend {
	t.Helper()
	out := []backend{{name: "sqlite", dsn: filepath.Join(t.TempDir(), "journal.db")}}
	admin := os.Getenv(postgresEnv)
	if admin == "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("%s is not set: make test starts PostgreSQL and sets it", postgresEnv)
		}
		t.Logf("%s is not set; skipping the PostgreSQL back end (make test sets it)", postgresEnv)
		return out
	}
	db, err := sql.Open("pgx", admin)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	b := make([]byte, 6)
	rand.Read(b)
	name := "journal_" + hex.EncodeToString(b)
	if _, err := db.Exec("CREATE DATABASE " + name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		db, err := sql.Open("pgx", admin)
		if err == nil {
			db.Exec("DROP DATABASE IF EXISTS " + name + " WITH (FORCE)")
			db.Close()
		}
	})
	u, err := url.Parse(admin)
	if err != nil {
		t.Fatal(err)
	}
	u.Path = "/" + name
	return append(out, backend{name: "postgres", dsn: u.String()})
}

// eachBackend runs f once per back end.
func eachBackend(t *testing.T, f func(t *testing.T, b backend)) {
	for _, b := range backends(t) {
		t.Run(b.name, func(t *testing.T) { f(t, b) })
	}
}

func (b backend) open(t testing.TB) *journal.Store {
	t.Helper()
	s, err := journal.Open(context.Background(), journal.Config{DSN: b.dsn, Signer: testSigner, VerifierKey: testVKey})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

// raw opens the database behind the journal's back, as an attacker who owns
// it would.
func (b backend) raw(t *testing.T) *sql.DB {
	t.Helper()
	driver, dsn := "sqlite", "file:"+b.dsn
	if b.name == "postgres" {
		driver, dsn = "pgx", b.dsn
	}
	db, err := sql.Open(driver, dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}
