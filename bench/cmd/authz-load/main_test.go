package main

import (
	"math"
	"testing"
)

// TestBuckets: every value lands in a bucket whose middle is within 1/128
// of it, buckets never go backwards, and quantiles come back from a known
// distribution within that error.
func TestBuckets(t *testing.T) {
	prev := 0
	for v := uint64(1); v < 1<<40; v += v/97 + 1 {
		b := bucket(v)
		if b < prev {
			t.Fatalf("bucket(%d) = %d, below bucket %d of a smaller value", v, b, prev)
		}
		prev = b
		if got := bucketValue(b); math.Abs(got-float64(v)) > float64(v)/subBuckets {
			t.Fatalf("value %d: bucket %d reads %.0f, more than 1/%d off", v, b, got, subBuckets)
		}
	}
	s := &workerStats{hist: make([]uint64, 64*subBuckets), min: math.MaxUint64}
	for v := uint64(1); v <= 100000; v++ {
		s.record(v * 1000)
		s.allowed++
	}
	for _, q := range []float64{0.5, 0.99, 0.999} {
		want := q * 100000 * 1000
		if got := s.quantile(q); math.Abs(got-want) > want/subBuckets+1000 {
			t.Errorf("quantile %v = %.0f, want %.0f", q, got, want)
		}
	}
}
