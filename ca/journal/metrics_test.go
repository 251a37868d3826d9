package journal_test

import (
	"context"
	"fmt"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// TestMetrics: a Store registered with a Prometheus registry exports one
// append-latency observation per durable append, and one batch-size
// observation per commit whose sizes add up to the appends.
func TestMetrics(t *testing.T) { eachBackend(t, testMetrics) }

func testMetrics(t *testing.T, b backend) {
	s := b.open(t)
	reg := prometheus.NewRegistry()
	reg.MustRegister(s)
	const n = 40
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := s.RecordIssuance(context.Background(), renewal(fmt.Sprint("m", i), "spiffe://cluster.local/m"), nil); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][2]float64{} // name: count, sum
	for _, f := range families {
		h := f.GetMetric()[0].GetHistogram()
		got[f.GetName()] = [2]float64{float64(h.GetSampleCount()), h.GetSampleSum()}
	}
	lat, ok := got[journal.MetricAppendSeconds]
	if !ok || lat[0] != n || lat[1] <= 0 {
		t.Errorf("%s: count, sum = %v, want %d appends taking some time", journal.MetricAppendSeconds, lat, n)
	}
	bs, ok := got[journal.MetricCommitBatchSize]
	if !ok || bs[0] < 1 || bs[0] > n || bs[1] != n {
		t.Errorf("%s: count, sum = %v, want 1..%d commits holding %d appends", journal.MetricCommitBatchSize, bs, n, n)
	}
}
