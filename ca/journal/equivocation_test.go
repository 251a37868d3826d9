package journal_test

import (
	"context"
	"strings"
	"sync"
	"testing"

	"golang.org/x/mod/sumdb/note"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// recordingSigner records every message the CA's checkpoint key signs, as
// anyone who sees what is sent to PostgreSQL can.
type recordingSigner struct {
	note.Signer
	mu   sync.Mutex
	msgs []string
}

func (r *recordingSigner) Sign(msg []byte) ([]byte, error) {
	r.mu.Lock()
	r.msgs = append(r.msgs, string(msg))
	r.mu.Unlock()
	return r.Signer.Sign(msg)
}

// Two replicas appending in turn on one PostgreSQL: the checkpoint key must
// never sign two different trees of one size, even one that was never
// published. Anyone who can read what is sent to the database would hold a
// signed fork (an equivocation) and could raise false fork alarms.
func TestRacingReplicasNeverSignTwoTreesOfOneSize(t *testing.T) {
	bs := backends(t)
	if len(bs) < 2 {
		t.Skip("needs PostgreSQL")
	}
	b := bs[1]
	rec := &recordingSigner{Signer: testSigner}
	open := func() *journal.Store {
		s, err := journal.Open(context.Background(), journal.Config{DSN: b.dsn, Signer: rec, VerifierKey: testVKey})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { s.Close() })
		return s
	}
	ctx := context.Background()
	a, c := open(), open()
	if _, err := a.RecordIssuance(ctx, renewal("a-1", "spiffe://cluster.local/a"), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.RecordIssuance(ctx, renewal("c-1", "spiffe://cluster.local/c"), nil); err != nil {
		t.Fatal(err)
	}
	if _, err := a.RecordIssuance(ctx, renewal("a-2", "spiffe://cluster.local/a"), nil); err != nil {
		t.Fatal(err)
	}
	bySize := map[string]map[string]bool{}
	for _, m := range rec.msgs {
		lines := strings.Split(m, "\n")
		if len(lines) < 3 {
			continue
		}
		if bySize[lines[1]] == nil {
			bySize[lines[1]] = map[string]bool{}
		}
		bySize[lines[1]][lines[2]] = true
	}
	for size, roots := range bySize {
		if len(roots) > 1 {
			t.Errorf("the checkpoint key signed %d different roots at size %s: %v", len(roots), size, roots)
		}
	}
}
