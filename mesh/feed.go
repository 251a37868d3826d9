package mesh

import (
	"context"
	"errors"
	"log/slog"
	"reflect"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/internal/feed"
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
	feed *feed.Feed[*Snapshot]
}

var _ Source = (*Feed)(nil)

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
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f, err := feed.New(feed.Config[*Snapshot]{
		Watch: cfg.Source.Watch,
		Load: func(v uint64) (*Snapshot, error) {
			m, err := cfg.Source.Mesh()
			if err != nil {
				return nil, err
			}
			return &Snapshot{Version: v, Mesh: m}, nil
		},
		Same: func(cur, next *Snapshot) bool { return sameMesh(cur.Mesh, next.Mesh) },
		Published: func(s *Snapshot, v uint64) {
			log.Info("mesh snapshot published", "mesh_version", v, "services", len(s.Mesh.Services))
		},
		Refused: func(err error) { log.Error("mesh update refused; last good mesh kept", "error", err) },
		Settle:  cfg.Settle,
		Clock:   cfg.Clock,
		Errors: feed.Errors{
			Watching: "mesh: watching the mesh",
			Waiting:  "mesh: waiting for the first mesh snapshot",
			Metrics:  "mesh: feed metrics",
		},
		Metrics: feed.Metrics{
			Registerer: cfg.Registerer,
			Published: prometheus.CounterOpts{
				Name: "trustmesh_mesh_snapshots_total", Help: "Mesh snapshots published: the first load and every accepted change.",
			},
			Refused: prometheus.CounterOpts{
				Name: "trustmesh_mesh_refusals_total", Help: "Mesh updates refused; the last good snapshot stays in force.",
			},
			Version: prometheus.GaugeOpts{
				Name: "trustmesh_mesh_version", Help: "Version of the mesh snapshot in force.",
			},
		},
	})
	if err != nil {
		return nil, err
	}
	return &Feed{feed: f}, nil
}

// Current returns the snapshot in force, nil before the first load.
func (f *Feed) Current() *Snapshot { return f.feed.Current() }

// Ready is closed once the first snapshot is published.
func (f *Feed) Ready() <-chan struct{} { return f.feed.Ready() }

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
	return f.feed.Watch(ctx, changed)
}

// Load parses the source once and publishes the result if it differs from
// the mesh in force. A mesh the source refuses is an error, and the last
// good snapshot stays in force. Concurrent Loads run one after another, so
// versions follow the order of the parses.
func (f *Feed) Load() (*Snapshot, error) { return f.feed.Load() }

// Run watches the source, loads it (failing if the first load fails), then
// reloads once changes have settled, until ctx ends. The source's watch
// ends with Run; a watch that ends while Run runs is an error.
func (f *Feed) Run(ctx context.Context) error { return f.feed.Run(ctx) }

// sameMesh reports whether two meshes hold the same model, leaving out the
// lookup index a Mesh builds on first use.
func sameMesh(a, b *Mesh) bool {
	return reflect.DeepEqual(a.Services, b.Services) && reflect.DeepEqual(a.Workloads, b.Workloads) &&
		reflect.DeepEqual(a.External, b.External) && reflect.DeepEqual(a.Gateways, b.Gateways) &&
		reflect.DeepEqual(a.Secrets, b.Secrets) && reflect.DeepEqual(a.Refusals, b.Refusals) &&
		reflect.DeepEqual(a.Nodes, b.Nodes)
}
