package source

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sort"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/internal/watch"
)

// Snapshot is one AuthorizationPolicy set as a Feed published it. It is
// immutable: every subscriber holds the same value and none may modify it
// or its policies.
type Snapshot struct {
	// Version counts the snapshots the Feed published: 1 for the first
	// load, one more for every change that was accepted.
	Version uint64
	// Digest names the policies by content (policy.Digest), the same for
	// every source and process that holds the same policies.
	Digest string
	// Policies are sorted by Key.
	Policies []*policy.Policy
}

// FeedConfig configures a Feed.
type FeedConfig struct {
	Policies PolicySource
	// Settle is how long changes must stop before a reload, so that a file
	// caught half-written (an empty file is a valid, empty policy set) is
	// not loaded; zero means DefaultSettle.
	Settle time.Duration
	// Clock times Settle; nil means the real clock.
	Clock clock.WithTicker
	Log   *slog.Logger
	// Registerer, when set, receives the feed's metrics.
	Registerer prometheus.Registerer

	// onRefused tells a Loader that feeds from its own source (Config.Policies) of refusals.
	onRefused func(error)
}

// Feed is the one owner of the AuthorizationPolicies: it watches a
// PolicySource, parses it once per settled change and publishes each new
// set as an immutable, versioned Snapshot to every subscriber (the engine,
// the xDS server), in the manner of go-control-plane's snapshot cache. An
// update that does not parse is refused: nothing is published and every
// subscriber keeps the last good snapshot. A reload that finds the same
// policies publishes nothing either.
type Feed struct {
	cfg FeedConfig
	log *slog.Logger

	// loadMu serializes Load from read to publish, so that a slower Load
	// cannot publish an older read as a newer version.
	loadMu sync.Mutex
	mu     sync.Mutex
	cur    *Snapshot
	subs   map[*subscriber]struct{}
	ready  chan struct{}

	published, refused prometheus.Counter
	version            prometheus.Gauge
}

type subscriber struct{ changed func() }

// NewFeed validates cfg and returns a Feed. Nothing is read until Run.
func NewFeed(cfg FeedConfig) (*Feed, error) {
	if cfg.Policies == nil {
		return nil, errors.New("source: a feed needs a policy source")
	}
	if cfg.Settle <= 0 {
		cfg.Settle = DefaultSettle
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	f := &Feed{
		cfg: cfg, log: cfg.Log, subs: map[*subscriber]struct{}{}, ready: make(chan struct{}),
		published: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trustmesh_policy_snapshots_total", Help: "AuthorizationPolicy snapshots published: the first load and every accepted change.",
		}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trustmesh_policy_refusals_total", Help: "AuthorizationPolicy updates refused; the last good snapshot stays in force.",
		}),
		version: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "trustmesh_policy_version", Help: "Version of the AuthorizationPolicy snapshot in force.",
		}),
	}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{f.published, f.refused, f.version} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("source: feed metrics: %w", err)
			}
		}
	}
	return f, nil
}

// Current returns the snapshot in force, nil before the first load.
func (f *Feed) Current() *Snapshot {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.cur
}

// Ready is closed once the first snapshot is published.
func (f *Feed) Ready() <-chan struct{} { return f.ready }

// Policies returns the snapshot in force: its version and its policies,
// which the caller must not modify. Before the first snapshot it is 0 and
// nil. With Watch it makes the Feed the xDS server's policy feed.
func (f *Feed) Policies() (version uint64, ps []*policy.Policy) {
	if s := f.Current(); s != nil {
		return s.Version, s.Policies
	}
	return 0, nil
}

// Watch subscribes changed to the feed: it returns once the first snapshot
// is published (or fails when ctx ends first), then calls changed after
// every new snapshot until ctx ends. changed must not block; it is told
// that Current may have moved on, not what it is. The channel receives nil
// when ctx ends.
func (f *Feed) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	select {
	case <-f.ready:
	case <-ctx.Done():
		return nil, fmt.Errorf("source: waiting for the first policy snapshot: %w", context.Cause(ctx))
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

// Load reads and parses the source once and publishes the result if it is
// new. A source that does not parse is refused with an error wrapping
// ErrRefused, and the last good snapshot stays in force. Concurrent Loads
// run one after another, so versions follow the order of the reads.
func (f *Feed) Load() (*Snapshot, error) {
	f.loadMu.Lock()
	defer f.loadMu.Unlock()
	ps, err := f.cfg.Policies.Policies()
	if err != nil {
		f.refused.Inc()
		err = fmt.Errorf("%w: %w", ErrRefused, err)
		f.log.Error("policy update refused; last good policy set kept", "error", err)
		if f.cfg.onRefused != nil {
			f.cfg.onRefused(err)
		}
		return f.Current(), err
	}
	ps = append([]*policy.Policy(nil), ps...)
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Key() < ps[j].Key() })
	digest := policy.Digest(ps)
	f.mu.Lock()
	if f.cur != nil && f.cur.Digest == digest {
		cur := f.cur
		f.mu.Unlock()
		return cur, nil
	}
	var v uint64 = 1
	if f.cur != nil {
		v = f.cur.Version + 1
	}
	f.cur = &Snapshot{Version: v, Digest: digest, Policies: ps}
	snap := f.cur
	subs := make([]*subscriber, 0, len(f.subs))
	for s := range f.subs {
		subs = append(subs, s)
	}
	if v == 1 {
		close(f.ready)
	}
	f.mu.Unlock()
	f.published.Inc()
	f.version.Set(float64(v))
	f.log.Info("policy snapshot published", "policy_version", v, "policy_digest", digest, "policies", len(ps))
	for _, s := range subs {
		s.changed()
	}
	return snap, nil
}

// Run watches the source, loads it (failing if the first load fails), then
// reloads once changes have settled, until ctx ends.
func (f *Feed) Run(ctx context.Context) error {
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
	watchDone, err := f.cfg.Policies.Watch(ctx, changed)
	if err != nil {
		return fmt.Errorf("source: watching policies: %w", err)
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
				// subscriber on stale policies: fail instead.
				err = errors.New("the watch ended")
			}
			return fmt.Errorf("source: watching policies: %w", err)
		case <-kick:
			settle.Kick()
		case <-settle.C():
			settle.Fired()
			_, _ = f.Load() // a refused update is logged; the old snapshot serves
		}
	}
}
