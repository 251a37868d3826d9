package journal

import (
	"testing"
	"time"
)

// storeWithQueue is a Store with only what fill and wait use, and n ops
// already queued.
func storeWithQueue(n int, delay time.Duration) *Store {
	s := &Store{cfg: Config{MaxBatch: 512, CommitDelay: delay}, ops: make(chan *op, 64), closed: make(chan struct{})}
	for range n {
		s.ops <- &op{}
	}
	return s
}

// within runs f and fails the test if it has not returned after 10 s: the
// waits under test must end on their own conditions, not on their timer.
func within(t *testing.T, f func() []*op) []*op {
	t.Helper()
	done := make(chan []*op, 1)
	go func() { done <- f() }()
	select {
	case b := <-done:
		return b
	case <-time.After(10 * time.Second):
		t.Fatal("the batch was held open past its conditions")
		return nil
	}
}

func TestFillTakesWhatIsQueuedUpToMaxBatch(t *testing.T) {
	s := storeWithQueue(5, time.Hour)
	if got := len(s.fill([]*op{{}})); got != 6 {
		t.Fatalf("batch of %d, want the first op and the 5 queued", got)
	}
	s = storeWithQueue(5, time.Hour)
	s.cfg.MaxBatch = 3
	if got := len(s.fill([]*op{{}})); got != 3 {
		t.Fatalf("batch of %d, want MaxBatch 3", got)
	}
	if len(s.ops) != 3 {
		t.Fatalf("%d ops left queued, want 3 for the next batch", len(s.ops))
	}
}

func TestWaitEndsOnceTheBatchHoldsWhatItWants(t *testing.T) {
	// An hour's delay: the wait must end because want ops are in.
	s := storeWithQueue(5, time.Hour)
	if got := len(within(t, func() []*op { return s.wait([]*op{{}}, 4) })); got != 4 {
		t.Fatalf("batch of %d, want 4", got)
	}
	if len(s.ops) != 2 {
		t.Fatalf("%d ops left queued, want 2", len(s.ops))
	}
	// MaxBatch caps what it wants.
	s = storeWithQueue(5, time.Hour)
	s.cfg.MaxBatch = 2
	if got := len(within(t, func() []*op { return s.wait([]*op{{}}, 100) })); got != 2 {
		t.Fatalf("batch of %d, want MaxBatch 2", got)
	}
}

func TestWaitEndsAtCloseOrAfterTheDelay(t *testing.T) {
	s := storeWithQueue(1, time.Hour)
	close(s.closed)
	if got := len(within(t, func() []*op { return s.wait([]*op{{}}, 100) })); got > 2 {
		t.Fatalf("batch of %d after close, want at most the 2 ops there were", got)
	}
	s = storeWithQueue(2, time.Nanosecond)
	if got := len(within(t, func() []*op { return s.wait([]*op{{}}, 100) })); got > 3 {
		t.Fatalf("batch of %d, want at most the 3 ops there were", got)
	}
}
