package journal

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"
)

// storeWithQueue is a Store with only what fill and wait use, and n ops
// already queued.
func storeWithQueue(n int, delay time.Duration, clk *clocktesting.FakeClock) *Store {
	s := &Store{cfg: Config{MaxBatch: 512, CommitDelay: delay, Clock: clk}, ops: make(chan *op, 64), closed: make(chan struct{})}
	for range n {
		s.ops <- &op{}
	}
	return s
}

// within runs f and fails the test if it has not returned after 10 s.
func within[T any](t *testing.T, f func() T) T {
	t.Helper()
	done := make(chan T, 1)
	go func() { done <- f() }()
	select {
	case v := <-done:
		return v
	case <-time.After(10 * time.Second):
		t.Fatal("held past its conditions")
		var zero T
		return zero
	}
}

func TestFillTakesWhatIsQueuedUpToMaxBatch(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	s := storeWithQueue(5, time.Hour, clk)
	if got := len(s.fill([]*op{{}})); got != 6 {
		t.Fatalf("batch of %d, want the first op and the 5 queued", got)
	}
	s = storeWithQueue(5, time.Hour, clk)
	s.cfg.MaxBatch = 3
	if got := len(s.fill([]*op{{}})); got != 3 {
		t.Fatalf("batch of %d, want MaxBatch 3", got)
	}
	if len(s.ops) != 3 {
		t.Fatalf("%d ops left queued, want 3 for the next batch", len(s.ops))
	}
}

func TestWaitEnds(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	t.Run("once the batch holds what it wants", func(t *testing.T) {
		s := storeWithQueue(5, time.Hour, clk)
		if got := len(within(t, func() []*op { return s.wait([]*op{{}}, 4) })); got != 4 {
			t.Fatalf("batch of %d, want 4", got)
		}
		if len(s.ops) != 2 {
			t.Fatalf("%d ops left queued, want 2", len(s.ops))
		}
	})
	t.Run("at MaxBatch", func(t *testing.T) {
		s := storeWithQueue(5, time.Hour, clk)
		s.cfg.MaxBatch = 2
		if got := len(within(t, func() []*op { return s.wait([]*op{{}}, 100) })); got != 2 {
			t.Fatalf("batch of %d, want MaxBatch 2", got)
		}
	})
	t.Run("at close", func(t *testing.T) {
		s := storeWithQueue(0, time.Hour, clk)
		close(s.closed)
		if got := len(within(t, func() []*op { return s.wait([]*op{{}}, 100) })); got != 1 {
			t.Fatalf("batch of %d after close, want the 1 op there was", got)
		}
	})
	t.Run("after the delay, on the clock", func(t *testing.T) {
		s := storeWithQueue(2, time.Hour, clk)
		done := make(chan int, 1)
		go func() { done <- len(s.wait([]*op{{}}, 100)) }()
		within(t, func() bool {
			for !clk.HasWaiters() {
				time.Sleep(time.Millisecond) // the wait's timer is set on another goroutine
			}
			return true
		})
		select {
		case n := <-done:
			t.Fatalf("returned a batch of %d before the delay", n)
		default:
		}
		clk.Step(time.Hour)
		if got := within(t, func() int { return <-done }); got != 3 {
			t.Fatalf("batch of %d, want the 3 ops there were", got)
		}
	})
}

func openForTest(t *testing.T, clk *clocktesting.FakeClock) *Store {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, _, err := NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	s, err := Open(context.Background(), Config{DSN: filepath.Join(t.TempDir(), "journal.db"), Signer: signer,
		CommitDelay: time.Hour, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { s.Close() })
	return s
}

func appendOne(s *Store, serial string) error {
	now := time.Now()
	_, err := s.RecordIssuance(context.Background(), Issuance{Time: now, Serial: serial, SPIFFEID: "spiffe://cluster.local/x",
		Method: "join-token", Origin: OriginJoinToken, NotBefore: now, NotAfter: now.Add(time.Hour)}, nil)
	return err
}

// After a burst, the committer waits for company; once it has sat idle for
// longer than the delay, the next caller is alone again and does not wait.
func TestLoneCallerAfterABurstDoesNotWait(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	s := openForTest(t, clk)
	warmUp(t, s, clk, func(i int) error { return appendOne(s, fmt.Sprint("burst-", i)) })
	// The committer sits idle for longer than the delay.
	clk.Step(2 * time.Hour)
	err := within(t, func() error {
		for i := range 3 {
			if err := appendOne(s, fmt.Sprint("lone-", i)); err != nil {
				return err
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
}

// Once a batch holds as many ops as the one before it, it commits at once:
// the committer waits for the callers the last commit released, never for
// its timer as well. The clock never moves here, so a batch that waited for
// more than that would hold its callers forever.
func TestBatchAsLargeAsTheLastDoesNotWait(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	s := openForTest(t, clk)
	warmUp(t, s, clk, func(i int) error { return appendOne(s, fmt.Sprint("warm-", i)) })
	// As many callers as the last batch held come back; nobody steps the
	// clock.
	burst(t, clk, s.lastBatch, false, func(i int) error { return appendOne(s, fmt.Sprint("again-", i)) })
}

// warmUp makes bursts of 32 appends until the committer's last batch held
// at least CommitSiblings, so that the next batch may wait for company.
func warmUp(t *testing.T, s *Store, clk *clocktesting.FakeClock, appendOne func(i int) error) {
	t.Helper()
	for try := 0; s.lastBatch < DefaultCommitSiblings; try++ {
		if try == 10 {
			t.Fatalf("10 bursts never made a batch of %d", DefaultCommitSiblings)
		}
		burst(t, clk, 32, true, func(i int) error { return appendOne(32*try + i) })
	}
}

// burst runs n calls of appendOne at once and fails the test if one fails
// or they are not all done within 10 s. With step, a batch that waits for
// company on the clock has it stepped until the burst is in.
func burst(t *testing.T, clk *clocktesting.FakeClock, n int, step bool, appendOne func(i int) error) {
	t.Helper()
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- appendOne(i)
		}()
	}
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	within(t, func() bool {
		for {
			select {
			case <-done:
				return true
			case <-time.After(time.Millisecond):
			}
			if step && clk.HasWaiters() {
				clk.Step(time.Hour)
			}
		}
	})
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
}

func TestAppendAfterCloseFails(t *testing.T) {
	s := openForTest(t, clocktesting.NewFakeClock(time.Now()))
	if err := s.Close(); err != nil {
		t.Fatal(err)
	}
	for i := range 20 {
		if err := within(t, func() error { return appendOne(s, fmt.Sprint("late-", i)) }); !errors.Is(err, ErrClosed) {
			t.Fatalf("append after Close = %v, want ErrClosed", err)
		}
	}
	if err := s.Close(); err != nil {
		t.Fatalf("second Close = %v", err)
	}
}

// TestFailedCommitDiscardsItsConnection: the committer keeps one SQLite
// connection from commit to commit, and after a failed commit the next
// one runs on a new connection, not on the one the pool hands back first.
func TestFailedCommitDiscardsItsConnection(t *testing.T) {
	ctx := context.Background()
	db, err := openSQLite(filepath.Join(t.TempDir(), "journal.db"), false)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	s := &Store{db: db}
	driverConn := func() any {
		t.Helper()
		w, err := s.writerConn(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var dc any
		if err := w.Raw(func(c any) error { dc = c; return nil }); err != nil {
			t.Fatal(err)
		}
		return dc
	}
	first := driverConn()
	if again := driverConn(); again != first {
		t.Fatal("the commit connection changed between two commits")
	}
	s.releaseWriter(true)
	if next := driverConn(); next == first {
		t.Fatal("after a failed commit the next one ran on the same connection")
	}
	s.releaseWriter(false)
}
