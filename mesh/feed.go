package mesh

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"reflect"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/internal/watch"
)

// DefaultSettle is the default quiet period before a Feed reloads.
const DefaultSettle = 250 * time.Millisecond

// Snapshot is one mesh as a Feed published it. It is immutable: every
// subscriber holds the same value and none may modify it or its mesh.
type Snapshot struct {
	// Version counts the snapshots the Feed published: 1 for the first
	// load, one more for every change that was accepted.
	Version uint64
	Mesh    *Mesh
}

// FeedConfig configures a Feed.
type FeedConfig struct {
	Source Source
	// Settle is how long changes must stop before a reload, so that a burst
	// of events is parsed once and a file caught half-written (an empty
	// file is a valid, empty mesh) is not loaded; zero means DefaultSettle.
	Settle time.Duration
	// Clock times Settle; nil means the real clock.
	Clock clock.WithTicker
	Log   *slog.Logger
	// Registerer, when set, receives the feed's metrics.
	Registerer prometheus.Registerer
}

// Feed is the one owner of a mesh Source for every consumer of the mesh
// (the xDS server, the authorization service's gateway identities): it runs
// one watch on the Source, parses it once per settled change and publishes
// each mesh as an immutable, versioned Snapshot, so that every consumer sees
// the same mesh. A mesh the Source refuses publishes nothing and every
// subscriber keeps the last good snapshot; a reload that finds the same
// mesh publishes nothing either.
//
// A Feed is itself a Source: Mesh returns the mesh in force and Watch
// subscribes to new snapshots, so consumers that take a Source need no
// change.
type Feed struct {
	cfg FeedConfig
	log *slog.Logger

	mu    sync.Mutex
	cur   *Snapshot
	subs  map[*subscriber]struct{}
	ready chan struct{}

	published, refused prometheus.Counter
	version            prometheus.Gauge
}

var _ Source = (*Feed)(nil)

type subscriber struct{ changed func() }

// ErrNoSnapshot is Feed.Mesh's error before the first snapshot.
var ErrNoSnapshot = errors.New("mesh: no mesh snapshot published yet")

// NewFeed validates cfg and returns a Feed. Nothing is read until Run.
func NewFeed(cfg FeedConfig) (*Feed, error) {
	if cfg.Source == nil {
		return nil, errors.New("mesh: a feed needs a mesh source")
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
			Name: "trustmesh_mesh_snapshots_total", Help: "Mesh snapshots published: the first load and every accepted change.",
		}),
		refused: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trustmesh_mesh_refusals_total", Help: "Mesh updates refused; the last good snapshot stays in force.",
		}),
		version: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "trustmesh_mesh_version", Help: "Version of the mesh snapshot in force.",
		}),
	}
	if f.log == nil {
		f.log = slog.New(slog.DiscardHandler)
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{f.published, f.refused, f.version} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("mesh: feed metrics: %w", err)
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

// Mesh returns the mesh in force, which the caller must not modify, or
// ErrNoSnapshot before the first snapshot. It never parses.
func (f *Feed) Mesh() (*Mesh, error) {
	if s := f.Current(); s != nil {
		return s.Mesh, nil
	}
	return nil, ErrNoSnapshot
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
		return nil, fmt.Errorf("mesh: waiting for the first mesh snapshot: %w", context.Cause(ctx))
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

// Load parses the source once and publishes the result if it differs from
// the mesh in force. A mesh the source
// refuses is an error, and the last good snapshot stays in force.
func (f *Feed) Load() (*Snapshot, error) {
	m, err := f.cfg.Source.Mesh()
	if err != nil {
		f.refused.Inc()
		f.log.Error("mesh update refused; last good mesh kept", "error", err)
		return f.Current(), err
	}
	f.mu.Lock()
	if f.cur != nil && sameMesh(f.cur.Mesh, m) {
		// A burst that settled early, or a change that undid itself.
		cur := f.cur
		f.mu.Unlock()
		return cur, nil
	}
	var v uint64 = 1
	if f.cur != nil {
		v = f.cur.Version + 1
	}
	f.cur = &Snapshot{Version: v, Mesh: m}
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
	f.log.Info("mesh snapshot published", "mesh_version", v, "services", len(m.Services))
	for _, s := range subs {
		s.changed()
	}
	return snap, nil
}

// Run watches the source, loads it (failing if the first load fails), then
// reloads once changes have settled, until ctx ends. The source's watch
// ends with Run.
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
	watchDone, err := f.cfg.Source.Watch(ctx, changed)
	if err != nil {
		return fmt.Errorf("mesh: watching the mesh: %w", err)
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
				// subscriber on a stale mesh: fail instead.
				err = errors.New("the watch ended")
			}
			return fmt.Errorf("mesh: watching the mesh: %w", err)
		case <-kick:
			settle.Kick()
		case <-settle.C():
			settle.Fired()
			_, _ = f.Load() // a refused update is logged; the old snapshot serves
		}
	}
}

// sameMesh reports whether two meshes hold the same model, leaving out the
// lookup index a Mesh builds on first use.
func sameMesh(a, b *Mesh) bool {
	return reflect.DeepEqual(a.Services, b.Services) && reflect.DeepEqual(a.Workloads, b.Workloads) &&
		reflect.DeepEqual(a.External, b.External) && reflect.DeepEqual(a.Gateways, b.Gateways) &&
		reflect.DeepEqual(a.Secrets, b.Secrets) && reflect.DeepEqual(a.Refusals, b.Refusals)
}
