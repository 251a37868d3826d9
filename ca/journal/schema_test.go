package journal_test

import (
	"context"
	"testing"
)

// The journal's entries carry no index by SPIFFE ID: nothing reads by it,
// and each entry of a commit wrote a page of it. A journal made before,
// which has one, loses it when it is next opened, with its entries intact.
func TestNoIndexBySPIFFEID(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		ctx := context.Background()
		s := b.open(t)
		if _, err := s.RecordIssuance(ctx, renewal("01", "spiffe://cluster.local/ns/a/sa/b"), nil); err != nil {
			t.Fatal(err)
		}
		raw := b.raw(t)
		if hasIndex(t, b, "entries_spiffe_id") {
			t.Fatal("a new journal has an index on entries(spiffe_id)")
		}
		if !hasIndex(t, b, "entries_serial") {
			t.Fatal("the check finds no index at all: it cannot tell")
		}
		// As a journal from before has it.
		if _, err := raw.ExecContext(ctx, `CREATE INDEX entries_spiffe_id ON entries(spiffe_id, idx)`); err != nil {
			t.Fatal(err)
		}
		s.Close()
		s = b.open(t)
		if hasIndex(t, b, "entries_spiffe_id") {
			t.Fatal("reopening a journal kept its index on entries(spiffe_id)")
		}
		if _, err := s.LookupIssuance(ctx, "01"); err != nil {
			t.Fatalf("the entry written before: %v", err)
		}
	})
}

func hasIndex(t *testing.T, b backend, name string) bool {
	t.Helper()
	q := `SELECT count(*) FROM sqlite_master WHERE type = 'index' AND name = $1`
	if b.name == "postgres" {
		q = `SELECT count(*) FROM pg_indexes WHERE indexname = $1`
	}
	var n int
	if err := b.raw(t).QueryRowContext(context.Background(), q, name).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n > 0
}
