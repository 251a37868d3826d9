package source_test

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
)

// readCounter is a PolicySource whose every read returns a new policy set,
// numbered in the order the reads began. hold, when set, is called by a
// read after it has taken its number and before it returns.
type readCounter struct {
	mu    sync.Mutex
	reads int
	gen   map[string]int // digest -> read number
	hold  func(read int)
}

func (r *readCounter) Policies() ([]*policy.Policy, error) {
	r.mu.Lock()
	r.reads++
	n := r.reads
	hold := r.hold
	r.mu.Unlock()
	ps, err := policy.ParseYAML("read", []byte(denyPath(fmt.Sprintf("/read-%d", n))), "default")
	if err != nil {
		return nil, err
	}
	r.mu.Lock()
	r.gen[policy.Digest(ps)] = n
	r.mu.Unlock()
	if hold != nil {
		hold(n)
	}
	return ps, nil
}

func (r *readCounter) Watch(ctx context.Context, _ func()) (<-chan error, error) {
	done := make(chan error, 1)
	go func() { <-ctx.Done(); done <- nil }()
	return done, nil
}

func (r *readCounter) read(s *source.Snapshot) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.gen[s.Digest]
}

// TestConcurrentLoadsPublishInReadOrder: a Load that read the source
// earlier never publishes its policies as a newer version than a Load that
// read it later, so the snapshot in force is always the latest read. The
// first read is held until the second Load has returned, or for a while
// when Loads are serialized and the second cannot start.
func TestConcurrentLoadsPublishInReadOrder(t *testing.T) {
	src := &readCounter{gen: map[string]int{}}
	secondDone := make(chan struct{})
	src.hold = func(read int) {
		if read == 1 {
			select {
			case <-secondDone:
			case <-time.After(300 * time.Millisecond):
			}
		}
	}
	feed, err := source.NewFeed(source.FeedConfig{Policies: src})
	if err != nil {
		t.Fatal(err)
	}
	first := make(chan *source.Snapshot, 1)
	go func() {
		s, err := feed.Load()
		if err != nil {
			t.Error(err)
		}
		first <- s
	}()
	// Let the first Load take read 1 before the second starts.
	for {
		src.mu.Lock()
		n := src.reads
		src.mu.Unlock()
		if n >= 1 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	second, err := feed.Load()
	close(secondDone)
	if err != nil {
		t.Fatal(err)
	}
	snaps := []*source.Snapshot{<-first, second}
	for _, s := range snaps {
		if s.Version != uint64(src.read(s)) {
			t.Errorf("version %d publishes read %d: an older read was published as a newer version", s.Version, src.read(s))
		}
	}
	if cur := feed.Current(); src.read(cur) != 2 {
		t.Fatalf("the snapshot in force (version %d) holds read %d, want the latest read, 2", cur.Version, src.read(cur))
	}

	// Many concurrent Loads: versions follow the order of the reads.
	src.hold = nil
	var wg sync.WaitGroup
	var mu sync.Mutex
	seen := map[uint64]int{}
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 25 {
				s, err := feed.Load()
				if err != nil {
					t.Error(err)
					return
				}
				mu.Lock()
				seen[s.Version] = src.read(s)
				mu.Unlock()
			}
		}()
	}
	wg.Wait()
	last := 0
	for v := uint64(1); v <= feed.Current().Version; v++ {
		r, ok := seen[v]
		if !ok {
			continue
		}
		if r < last {
			t.Fatalf("version %d holds read %d, older than read %d of an earlier version", v, r, last)
		}
		last = r
	}
	if cur := feed.Current(); src.read(cur) != 2+8*25 {
		t.Fatalf("the snapshot in force holds read %d, want the latest, %d", src.read(cur), 2+8*25)
	}
}
