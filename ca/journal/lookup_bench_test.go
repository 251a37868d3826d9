package journal_test

import (
	"context"
	"fmt"
	"path/filepath"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// BenchmarkLookup measures what a renewal reads from the journal (the
// issuance of the certificate being renewed, and for a join-token identity
// its enrolment) in a log of 10,000 entries on SQLite.
func BenchmarkLookup(b *testing.B) {
	ctx := context.Background()
	s, err := journal.Open(ctx, journal.Config{DSN: filepath.Join(b.TempDir(), "journal.db"), Signer: testSigner, VerifierKey: testVKey})
	if err != nil {
		b.Fatal(err)
	}
	defer s.Close()
	const id = "spiffe://cluster.local/vm/bench"
	hash := make([]byte, 32)
	if err := s.CreateJoinToken(ctx, hash, journal.JoinToken{ID: "tokbench", SPIFFEID: id, CreatedAt: t0, ExpiresAt: t0.Add(time.Hour)}); err != nil {
		b.Fatal(err)
	}
	enrol := issuance("e0", id)
	enrol.EnrolmentID = "tokbench"
	if _, err := s.RecordIssuance(ctx, enrol, &journal.Redemption{TokenHash: hash, TokenID: "tokbench"}); err != nil {
		b.Fatal(err)
	}
	const n = 10000
	refusals := make([]journal.Refusal, 0, 100)
	for i := range n / 100 {
		refusals = refusals[:0]
		for j := range 100 {
			refusals = append(refusals, journal.Refusal{First: t0, Last: t0, Reason: fmt.Sprintf("r%d", i*100+j), Count: 1})
		}
		if err := s.AppendRefusals(ctx, refusals); err != nil {
			b.Fatal(err)
		}
	}
	serials := make([]string, 64)
	for i := range serials {
		serials[i] = fmt.Sprintf("%x", 0x1000+i)
		if _, err := s.RecordIssuance(ctx, issuance(serials[i], id), nil); err != nil {
			b.Fatal(err)
		}
	}
	b.Run("issuance", func(b *testing.B) {
		b.ReportAllocs()
		i := 0
		for b.Loop() {
			if _, err := s.LookupIssuance(ctx, serials[i%len(serials)]); err != nil {
				b.Fatal(err)
			}
			i++
		}
	})
	b.Run("enrolment", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if _, err := s.LookupEnrolment(ctx, "tokbench"); err != nil {
				b.Fatal(err)
			}
		}
	})
}
