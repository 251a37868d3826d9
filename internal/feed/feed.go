// Package feed is the one mechanism behind trustmesh's snapshot feeds (the
// mesh and the AuthorizationPolicies): a Feed watches one source, loads it
// once per settled change and publishes each new value as an immutable,
// versioned snapshot to every subscriber, in the manner of go-control-plane's
// snapshot cache. A load that fails publishes nothing and every subscriber
// keeps the last good snapshot; a reload that finds the same value publishes
// nothing either. What a snapshot holds, how it is read and compared, and how
// its feed names itself in errors, logs and metrics are the caller's.
package feed

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/internal/watch"
)

// Config configures a Feed of snapshots of type T, usually a pointer to an
// immutable snapshot whose zero value (nil) means "none yet".
type Config[T any] struct {
	// Watch watches the source: it calls changed after every change until
	// ctx ends, then sends nil on the channel. It is the Watch of a source
	// in the manner of internal/watch.
	Watch func(ctx context.Context, changed func()) (<-chan error, error)
	// Load reads the source once and returns the snapshot it would publish
	// as version; it is never called concurrently with itself. Its error
	// refuses the update.
	Load func(version uint64) (T, error)
	// Same reports whether next holds what cur, the snapshot in force,
	// holds; then next is not published. Nil means never.
	Same func(cur, next T) bool
	// Published, when set, is told of every snapshot published, after its
	// metrics are set and before Ready or its subscribers are.
	Published func(snap T, version uint64)
	// Refused, when set, is told of every refused update, with Load's error.
	Refused func(err error)

	// Settle is how long changes must stop before a reload; it must be
	// positive.
	Settle time.Duration
	// Clock times Settle; nil means the real clock.
	Clock clock.WithTicker

	// Errors name the feed in its errors.
	Errors Errors
	// Metrics name the feed's metrics.
	Metrics Metrics
}

// Errors are the prefixes of a Feed's errors, each followed by ": " and
// the cause.
type Errors struct {
	// Watching prefixes a watch of the source that failed or ended.
	Watching string
	// Waiting prefixes a Watch whose context ended before the first
	// snapshot.
	Waiting string
	// Metrics prefixes a metric that could not be registered.
	Metrics string
}

// Metrics describes a Feed's metrics: snapshots published, updates refused
// and the version in force.
type Metrics struct {
	// Registerer, when set, receives the metrics.
	Registerer         prometheus.Registerer
	Published, Refused prometheus.CounterOpts
	Version            prometheus.GaugeOpts
}

// Feed owns one source for every subscriber: see the package comment.
type Feed[T any] struct {
	cfg Config[T]

	// loadMu serializes Load from read to publish, so that a slower Load
	// cannot publish an older read as a newer version.
	loadMu  sync.Mutex
	mu      sync.Mutex
	cur     T
	version uint64 // of cur; 0 before the first snapshot
	subs    map[*subscriber]struct{}
	ready   chan struct{}

	published, refused prometheus.Counter
	versionGauge       prometheus.Gauge
}

type subscriber struct{ changed func() }

// New validates cfg and returns a Feed. Nothing is read until Run or Load.
func New[T any](cfg Config[T]) (*Feed[T], error) {
	if cfg.Watch == nil || cfg.Load == nil {
		return nil, errors.New("feed: a feed needs a watch and a load")
	}
	if cfg.Settle <= 0 {
		return nil, fmt.Errorf("feed: settle %v is not positive", cfg.Settle)
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	f := &Feed[T]{
		cfg: cfg, subs: map[*subscriber]struct{}{}, ready: make(chan struct{}),
		published:    prometheus.NewCounter(cfg.Metrics.Published),
		refused:      prometheus.NewCounter(cfg.Metrics.Refused),
		versionGauge: prometheus.NewGauge(cfg.Metrics.Version),
	}
	if r := cfg.Metrics.Registerer; r != nil {
		for _, c := range []prometheus.Collector{f.published, f.refused, f.versionGauge} {
			if err := r.Register(c); err != nil {
				return nil, fmt.Errorf("%s: %w", cfg.Errors.Metrics, err)
			}
		}
	}
	return f, nil
}

// Current returns the snapshot in force, the zero T before the first.
func (f *Feed[T]) Current() T {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cur
}

// Ready is closed once the first snapshot is published.
func (f *Feed[T]) Ready() <-chan struct{} { return f.ready }

// Watch subscribes changed to the feed: it returns once the first snapshot
// is published (or fails when ctx ends first), then calls changed after
// every new snapshot until ctx ends. changed must not block; it is told
// that Current may have moved on, not what it is. The channel receives nil
// when ctx ends.
func (f *Feed[T]) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	select {
	case <-f.ready:
	case <-ctx.Done():
		return nil, fmt.Errorf("%s: %w", f.cfg.Errors.Waiting, context.Cause(ctx))
	}
	sub := &subscriber{changed: changed}
	f.mu.Lock()
	f.subs[sub] = struct{}{}
	f.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		<-ctx.Done()
		f.mu.Lock()
		delete(f.subs, sub)
		f.mu.Unlock()
		done <- nil
	}()
	return done, nil
}

// Load reads the source once and publishes the result if it is new. A
// refused update returns the snapshot in force and Load's error. Concurrent
// Loads run one after another, so versions follow the order of the reads.
func (f *Feed[T]) Load() (T, error) {
	f.loadMu.Lock()
	defer f.loadMu.Unlock()
	// Only Load moves the version, and Loads are serialized.
	f.mu.Lock()
	v := f.version + 1
	f.mu.Unlock()
	next, err := f.cfg.Load(v)
	if err != nil {
		f.refused.Inc()
		if f.cfg.Refused != nil {
			f.cfg.Refused(err)
		}
		return f.Current(), err
	}
	f.mu.Lock()
	if f.version > 0 && f.cfg.Same != nil && f.cfg.Same(f.cur, next) {
		// A burst that settled early, or a change that undid itself.
		cur := f.cur
		f.mu.Unlock()
		return cur, nil
	}
	f.cur, f.version = next, v
	subs := make([]*subscriber, 0, len(f.subs))
	for s := range f.subs {
		subs = append(subs, s)
	}
	f.mu.Unlock()
	// Whoever hears of v, through Ready or a subscriber, finds its metrics
	// and its Published hook already done.
	f.published.Inc()
	f.versionGauge.Set(float64(v))
	if f.cfg.Published != nil {
		f.cfg.Published(next, v)
	}
	if v == 1 {
		close(f.ready)
	}
	for _, s := range subs {
		s.changed()
	}
	return next, nil
}

// Run watches the source, loads it (failing if the first load fails), then
// reloads once changes have settled, until ctx ends. The source's watch
// ends with Run; a watch that ends while Run runs is an error.
func (f *Feed[T]) Run(ctx context.Context) error {
	kick := make(chan struct{}, 1)
	changed := func() {
		select {
		case kick <- struct{}{}:
		default:
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	// The watch is in place before the first load, so no change between
	// the two is missed.
	watchDone, err := f.cfg.Watch(ctx, changed)
	if err != nil {
		return fmt.Errorf("%s: %w", f.cfg.Errors.Watching, err)
	}
	stop := func() {
		cancel()
		<-watchDone
	}
	if _, err := f.Load(); err != nil {
		stop()
		return err
	}
	settle := watch.NewSettle(f.cfg.Clock, f.cfg.Settle)
	defer settle.Stop()
	for {
		select {
		case <-ctx.Done():
			stop()
			return nil
		case err := <-watchDone:
			if ctx.Err() != nil {
				return nil
			}
			if err == nil {
				// A watch that ends while the feed runs would leave every
				// subscriber on a stale snapshot: fail instead.
				err = errors.New("the watch ended")
			}
			return fmt.Errorf("%s: %w", f.cfg.Errors.Watching, err)
		case <-kick:
			settle.Kick()
		case <-settle.C():
			settle.Fired()
			_, _ = f.Load() // a refused update is told to Refused; the old snapshot serves
		}
	}
}
