package journal

import (
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	clocktesting "k8s.io/utils/clock/testing"
)

// TestCommitSpanCarriesItsBatch: each traced append's ca.journal.commit
// span says the size of the batch that committed it and how long it sat in
// the queue first. A batch of k appends gives k spans saying k.
func TestCommitSpanCarriesItsBatch(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	s := openForTest(t, clk)
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	defer tp.Shutdown(context.Background())
	tracer := tp.Tracer("test")
	var appended atomic.Int64
	warmUp(t, s, clk, func(i int) error {
		appended.Add(1)
		ctx, span := tracer.Start(context.Background(), "caller")
		defer span.End()
		now := time.Now()
		_, err := s.RecordIssuance(ctx, Issuance{Time: now, Serial: fmt.Sprint("burst-", i), SPIFFEID: "spiffe://cluster.local/x",
			Method: "join-token", Origin: OriginJoinToken, NotBefore: now, NotAfter: now.Add(time.Hour)}, nil)
		return err
	})
	sizes := map[int64]int{}
	commits := 0
	for _, sp := range sr.Ended() {
		if sp.Name() != SpanCommit {
			continue
		}
		commits++
		if sp.InstrumentationScope().Name != "trustmesh/ca" {
			t.Errorf("tracer %q, want trustmesh/ca", sp.InstrumentationScope().Name)
		}
		var size int64 = -1
		wait := -1.0
		for _, kv := range sp.Attributes() {
			switch kv.Key {
			case AttrBatchSize:
				size = kv.Value.AsInt64()
			case AttrWaitMillis:
				wait = kv.Value.AsFloat64()
			}
		}
		if size < 1 || wait < 0 {
			t.Fatalf("span with batch size %d, wait %v ms", size, wait)
		}
		sizes[size]++
	}
	if commits != int(appended.Load()) {
		t.Fatalf("%d commit spans for %d appends", commits, appended.Load())
	}
	for k, n := range sizes {
		if n%int(k) != 0 {
			t.Errorf("%d spans say batch size %d: not whole batches (%v)", n, k, sizes)
		}
	}
	if len(sizes) == 1 && sizes[1] > 0 {
		t.Errorf("every batch held one append: %v", sizes)
	}
}
