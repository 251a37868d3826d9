//go:build linux

package journal

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/mod/sumdb/note"
)

// TestLookupsSkipTheSizeReadOnlyWhileNothingIsCommitted: an enrolment
// lookup reads the log's size only when the wal-index says a transaction
// was committed since the last read. A revocation, a token or a rewrite
// committed by another writer (here another Store and a raw connection
// on the same file, as the CLI or a second process would be) counts at
// the very next lookup.
func TestLookupsSkipTheSizeReadOnlyWhileNothingIsCommitted(t *testing.T) {
	dsn := filepath.Join(t.TempDir(), "journal.db")
	checkSkips(t, dsn, dsn)
}

// The journal's path is a symlink, with a stale wal-index beside it (left
// from before the file moved): SQLite uses the index beside the file the
// link names, and so must the lookups, or they would skip for ever.
func TestSymlinkedJournalReadsTheLiveIndex(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real", "journal.db")
	if err := os.Mkdir(filepath.Dir(real), 0o700); err != nil {
		t.Fatal(err)
	}
	s := openTestStore(t, real)
	link := filepath.Join(dir, "journal.db")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	stale, err := os.ReadFile(real + "-shm")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(link+"-shm", stale, 0o600); err != nil {
		t.Fatal(err)
	}
	s.Close()
	checkSkips(t, link, real)
}

// Closing one Store must not drop SQLite's locks on the wal-index for the
// others in the process: POSIX record locks go with any close of the file.
func TestClosingAStoreKeepsSQLitesLocks(t *testing.T) {
	dsn := filepath.Join(t.TempDir(), "journal.db")
	a := openTestStore(t, dsn)
	openTestStore(t, dsn).Close()
	if err := liveShm(a.wal.f); err != nil {
		t.Fatalf("after another Store on the file closed: %v", err)
	}
}

var testSigner, testVKey = func() (note.Signer, string) {
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		panic(err)
	}
	s, v, err := NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		panic(err)
	}
	return s, v
}()

func openTestStore(t *testing.T, dsn string) *Store {
	t.Helper()
	s, err := Open(context.Background(), Config{DSN: dsn, Signer: testSigner, VerifierKey: testVKey})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	if s.wal == nil {
		t.Fatal("the SQLite journal opened no wal-index")
	}
	return s
}

// checkSkips opens a Store a on dsnA and another on dsnOther, the same
// database, and checks when a's lookups read the log's size.
func checkSkips(t *testing.T, dsnA, dsnOther string) {
	ctx := context.Background()
	a, other := openTestStore(t, dsnA), openTestStore(t, dsnOther)
	dsn := dsnOther
	t0 := time.Now().UTC().Truncate(time.Second)
	enrol := func(s *Store, tok, id string) {
		t.Helper()
		hash := []byte(tok + "-0123456789abcdef0123456789abcdef")[:32]
		if err := s.CreateJoinToken(ctx, hash, JoinToken{ID: tok, SPIFFEID: id, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
		iss := Issuance{Time: t0, Serial: tok + "-1", SPIFFEID: id, Method: "join-token", Origin: OriginJoinToken,
			EnrolmentID: tok, NotBefore: t0, NotAfter: t0.Add(time.Hour)}
		if _, err := s.RecordIssuance(ctx, iss, &Redemption{TokenHash: hash, TokenID: tok}); err != nil {
			t.Fatal(err)
		}
	}
	// lookup looks tok up in a and checks how many size reads it took.
	lookup := func(tok string, wantReads int64) Enrolment {
		t.Helper()
		before := a.sizeReads.Load()
		e, err := a.LookupEnrolment(ctx, tok)
		if err != nil {
			t.Fatalf("LookupEnrolment(%s): %v", tok, err)
		}
		if got := a.sizeReads.Load() - before; got != wantReads {
			t.Fatalf("LookupEnrolment(%s) read the log's size %d times, want %d", tok, got, wantReads)
		}
		return e
	}

	enrol(a, "tok-a", "spiffe://cluster.local/a")
	lookup("tok-a", 0) // a's own commits are recorded as they commit
	lookup("tok-a", 0)
	lookup("tok-a", 0)

	// Another writer's token and enrolment: seen at the next lookup.
	enrol(other, "tok-b", "spiffe://cluster.local/b")
	lookup("tok-b", 1)
	lookup("tok-b", 0)

	// Another writer's commit, then one of a's before any lookup: a's
	// commit caught up with the other under its write lock, so its
	// lookups skip and still find what the other wrote.
	enrol(other, "tok-c", "spiffe://cluster.local/c")
	enrol(a, "tok-d", "spiffe://cluster.local/d")
	lookup("tok-c", 0)
	lookup("tok-d", 0)

	// Another writer's revocation: the very next lookup reports it.
	if _, err := other.Revoke(ctx, "spiffe://cluster.local/a", t0.Add(time.Minute)); err != nil {
		t.Fatal(err)
	}
	if e := lookup("tok-a", 1); e.RevokedAt.IsZero() {
		t.Fatal("the revocation another writer committed was not seen")
	}
	lookup("tok-a", 0)

	// A write that appends nothing still changes the header: the lookup
	// reads, finds the log as long as the ledger, and skips again after.
	raw, err := sql.Open("sqlite", "file:"+dsn+"?_pragma=busy_timeout(10000)")
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	if _, err := raw.ExecContext(ctx, `INSERT INTO meta(key, value) VALUES ('walindex-test', 'x')`); err != nil {
		t.Fatal(err)
	}
	lookup("tok-a", 1)
	lookup("tok-a", 0)

	// A rewrite that removes an entry behind the journal's back is caught
	// at the next lookup, as before.
	if _, err := raw.ExecContext(ctx, `DELETE FROM entries WHERE idx = (SELECT MAX(idx) FROM entries)`); err != nil {
		t.Fatal(err)
	}
	if _, err := a.LookupEnrolment(ctx, "tok-a"); err == nil {
		t.Fatal("a lookup after an entry was deleted succeeded, want ErrTampered")
	}
}

// A commit from elsewhere between the journal's own commit and its reading
// of the header must not be recorded as seen: the header then counts two
// transactions more than under the write lock, and the next lookup reads
// the log's size and finds the other's entry.
func TestOwnCommitRecordsOnlyItsOwnTransaction(t *testing.T) {
	ctx := context.Background()
	dsn := filepath.Join(t.TempDir(), "journal.db")
	a, other := openTestStore(t, dsn), openTestStore(t, dsn)
	t0 := time.Now().UTC().Truncate(time.Second)
	token := func(s *Store, id string) {
		t.Helper()
		hash := []byte(id + "-0123456789abcdef0123456789abcdef")[:32]
		if err := s.CreateJoinToken(ctx, hash, JoinToken{ID: id, SPIFFEID: "spiffe://cluster.local/" + id, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
			t.Fatal(err)
		}
	}
	token(a, "first")
	locked, ok := a.wal.header()
	if !ok {
		t.Fatal("no wal-index header")
	}
	token(other, "own")   // stands for a's commit
	token(other, "later") // lands before a reads the header
	a.wal.ownCommit(locked, a.ledger.publishedSize())
	before := a.sizeReads.Load()
	if _, err := a.LookupJoinToken(ctx, []byte("later-0123456789abcdef0123456789abcdef")[:32]); err != nil {
		t.Fatalf("the token committed after: %v", err)
	}
	if a.sizeReads.Load() == before {
		t.Fatal("the lookup trusted a header that counts a commit not its own")
	}
}
