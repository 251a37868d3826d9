package journal

import (
	"context"
	"fmt"
	"sync"
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
	serial := 0
	for try := 0; s.lastBatch < DefaultCommitSiblings; try++ {
		if try == 10 {
			t.Fatalf("10 bursts never made a batch of %d", DefaultCommitSiblings)
		}
		var wg sync.WaitGroup
		errs := make(chan error, 32)
		for range 32 {
			serial++
			wg.Add(1)
			go func(serial int) {
				defer wg.Done()
				ctx, span := tracer.Start(context.Background(), "caller")
				defer span.End()
				now := time.Now()
				_, err := s.RecordIssuance(ctx, Issuance{Time: now, Serial: fmt.Sprint("burst-", serial), SPIFFEID: "spiffe://cluster.local/x",
					Method: "join-token", Origin: OriginJoinToken, NotBefore: now, NotAfter: now.Add(time.Hour)}, nil)
				errs <- err
			}(serial)
		}
		done := make(chan struct{})
		go func() { wg.Wait(); close(done) }()
		within(t, func() bool {
			for {
				select {
				case <-done:
					return true
				default:
				}
				if clk.HasWaiters() {
					clk.Step(time.Hour)
				}
				time.Sleep(time.Millisecond)
			}
		})
		close(errs)
		for err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
	}
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
	if commits != serial {
		t.Fatalf("%d commit spans for %d appends", commits, serial)
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
