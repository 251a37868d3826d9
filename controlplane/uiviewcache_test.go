package controlplane

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestViewCacheSharesOneComputation: N concurrent requests for a view
// cause one computation, and later requests for the same key none.
func TestViewCacheSharesOneComputation(t *testing.T) {
	var c viewCache[journalKey, int]
	slots := make(chan struct{}, uiViewSlots)
	var computed atomic.Int32
	release := make(chan struct{})
	compute := func(context.Context) (int, error) {
		computed.Add(1)
		<-release
		return 42, nil
	}
	key := journalKey{size: 7}
	const n = 32
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			v, err := c.get(context.Background(), slots, key, compute)
			if err == nil && v != 42 {
				t.Errorf("got %d", v)
			}
			errs <- err
		}()
	}
	time.Sleep(100 * time.Millisecond) // let every request join the flight
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if got := computed.Load(); got != 1 {
		t.Errorf("%d concurrent requests caused %d computations, want 1", n, got)
	}
	if _, err := c.get(context.Background(), slots, key, compute); err != nil || computed.Load() != 1 {
		t.Errorf("a request for the stored key computed again (%d computations, %v)", computed.Load(), err)
	}
	if _, err := c.get(context.Background(), slots, journalKey{size: 8}, compute); err != nil || computed.Load() != 2 {
		t.Errorf("a grown journal did not recompute (%d computations, %v)", computed.Load(), err)
	}
}

// TestViewCacheBoundsComputations: views with different keys compute at
// most uiViewSlots at a time.
func TestViewCacheBoundsComputations(t *testing.T) {
	slots := make(chan struct{}, uiViewSlots)
	var running, most atomic.Int32
	compute := func(context.Context) (int, error) {
		r := running.Add(1)
		for {
			m := most.Load()
			if r <= m || most.CompareAndSwap(m, r) {
				break
			}
		}
		time.Sleep(20 * time.Millisecond)
		running.Add(-1)
		return 0, nil
	}
	caches := make([]viewCache[journalKey, int], 8)
	var wg sync.WaitGroup
	for i := range caches {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, err := caches[i].get(context.Background(), slots, journalKey{size: uint64(i)}, compute); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	if got := most.Load(); got > uiViewSlots || got == 0 {
		t.Errorf("%d computations ran at once, want at most %d", got, uiViewSlots)
	}
}

// TestViewCacheCallerGoneKeepsFlight: a caller that gives up does not fail
// the others sharing its computation.
func TestViewCacheCallerGoneKeepsFlight(t *testing.T) {
	var c viewCache[journalKey, int]
	slots := make(chan struct{}, 1)
	release := make(chan struct{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	started := make(chan struct{})
	go func() {
		_, err := c.get(ctx, slots, journalKey{}, func(ctx context.Context) (int, error) {
			close(started)
			<-release
			return 1, ctx.Err()
		})
		done <- err
	}()
	<-started // the flight is in store: the next caller shares it
	waiter := make(chan error, 1)
	go func() {
		_, err := c.get(context.Background(), slots, journalKey{}, nil)
		waiter <- err
	}()
	time.Sleep(50 * time.Millisecond)
	cancel()
	close(release)
	if err := <-done; err != nil {
		t.Errorf("the first caller: %v", err)
	}
	if err := <-waiter; err != nil {
		t.Errorf("a caller sharing the computation: %v", err)
	}
}
