package journal

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"path/filepath"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// TestLatestIssuanceTimeIsReadFromMemory: the clock guard asks for the
// newest issuance time before every signature. It is served from memory,
// raised by every issuance this Store commits, and read from the database
// only on the refresh schedule, after a clock that stepped back, or when
// a commit found rows written by another writer.
func TestLatestIssuanceTimeIsReadFromMemory(t *testing.T) {
	ctx := context.Background()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, vkey, err := NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	dsn := filepath.Join(t.TempDir(), "journal.db")
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	clk := clocktesting.NewFakeClock(t0)
	open := func() *Store {
		s, err := Open(ctx, Config{DSN: dsn, Signer: signer, VerifierKey: vkey, Clock: clk, LatestRefresh: time.Minute})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	issue := func(s *Store, serial string, at time.Time) {
		t.Helper()
		if _, err := s.RecordIssuance(ctx, Issuance{Time: at, Serial: serial, SPIFFEID: "spiffe://cluster.local/x",
			Method: "x509-renewal", Origin: OriginJoinToken, NotBefore: at, NotAfter: at.Add(time.Hour)}, nil); err != nil {
			t.Fatal(err)
		}
	}
	latest := func(s *Store, want time.Time, wantReads int) {
		t.Helper()
		got, err := s.LatestIssuanceTime(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if !got.Equal(want) {
			t.Fatalf("latest issuance %s, want %s", got, want)
		}
		s.latest.mu.Lock()
		reads := s.latest.reads
		s.latest.mu.Unlock()
		if reads != wantReads {
			t.Fatalf("%d database reads, want %d", reads, wantReads)
		}
	}

	a := open()
	latest(a, time.Time{}, 1) // empty log: one read
	issue(a, "01", t0)
	for range 1000 {
		latest(a, t0, 1) // its own issuance, from memory
	}
	issue(a, "02", t0.Add(time.Second))
	issue(a, "03", t0.Add(-time.Second)) // the greatest counts, not the last
	latest(a, t0.Add(time.Second), 1)

	// Another writer on the same log: a is behind until the refresh ...
	b := open()
	issue(b, "04", t0.Add(time.Hour))
	latest(a, t0.Add(time.Second), 1)
	clk.Step(time.Minute)
	latest(a, t0.Add(time.Hour), 2)
	latest(a, t0.Add(time.Hour), 2)

	// ... or until a commit of a's finds b's rows.
	issue(b, "05", t0.Add(2*time.Hour))
	issue(a, "06", t0.Add(time.Minute))
	latest(a, t0.Add(2*time.Hour), 3)

	// A clock that stepped back behind the last read does not trust it.
	clk.SetTime(t0.Add(-time.Hour))
	latest(a, t0.Add(2*time.Hour), 4)
	latest(a, t0.Add(2*time.Hour), 4)
}
