package journal_test

import (
	"context"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// BenchmarkAppend measures the journal alone: durable issuance records per
// second on SQLite at 1, 16 and 256 concurrent callers, each record
// committed (fsync and signed checkpoint included) before its call returns.
// The CA's issuance rate with the journal on can never exceed it.
func BenchmarkAppend(b *testing.B) {
	for _, c := range []int{1, 16, 256} {
		b.Run(fmt.Sprintf("c=%d", c), func(b *testing.B) {
			ctx := context.Background()
			s, err := journal.Open(ctx, journal.Config{DSN: filepath.Join(b.TempDir(), "journal.db"), Signer: testSigner, VerifierKey: testVKey})
			if err != nil {
				b.Fatal(err)
			}
			defer s.Close()
			const id = "spiffe://cluster.local/ns/bench/sa/append"
			var next atomic.Int64
			var wg sync.WaitGroup
			b.ResetTimer()
			start := time.Now()
			for range c {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := next.Add(1); i <= int64(b.N); i = next.Add(1) {
						if _, err := s.RecordIssuance(ctx, issuance(fmt.Sprintf("%x", 0x10000+i), id), nil); err != nil {
							b.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			b.ReportMetric(float64(b.N)/time.Since(start).Seconds(), "appends/s")
		})
	}
}
