package source

import (
	"context"
	"errors"
	"log/slog"
	"sort"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/internal/feed"
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
// update that does not parse, or that the engine refuses (every source
// makes engine.CheckPolicy of each policy: ParseFile, kube.ConvertV1), is
// refused: nothing is published and every subscriber keeps the last good
// snapshot. A reload that finds the same
// policies publishes nothing either.
type Feed struct {
	feed *feed.Feed[*Snapshot]
	src  PolicySource
}

// NewFeed validates cfg and returns a Feed. Nothing is read until Run.
func NewFeed(cfg FeedConfig) (*Feed, error) {
	if cfg.Policies == nil {
		return nil, errors.New("source: a feed needs a policy source")
	}
	if cfg.Settle <= 0 {
		cfg.Settle = DefaultSettle
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	f, err := feed.New(feed.Config[*Snapshot]{
		Watch: cfg.Policies.Watch,
		Load: func(v uint64) (*Snapshot, error) {
			ps, err := cfg.Policies.Policies()
			if err != nil {
				return nil, refusal(err, v == 1)
			}
			ps = append([]*policy.Policy(nil), ps...)
			sort.SliceStable(ps, func(i, j int) bool { return ps[i].Key() < ps[j].Key() })
			return &Snapshot{Version: v, Digest: policy.Digest(ps), Policies: ps}, nil
		},
		Same: func(cur, next *Snapshot) bool { return cur.Digest == next.Digest },
		Published: func(s *Snapshot, v uint64) {
			log.Info("policy snapshot published", "policy_version", v, "policy_digest", s.Digest, "policies", len(s.Policies))
		},
		Refused: func(err error) {
			logRefusal(log, err)
			if cfg.onRefused != nil {
				cfg.onRefused(err)
			}
		},
		Settle: cfg.Settle,
		Clock:  cfg.Clock,
		Errors: feed.Errors{
			Watching: "source: watching policies",
			Waiting:  "source: waiting for the first policy snapshot",
			Metrics:  "source: feed metrics",
		},
		Metrics: feed.Metrics{
			Registerer: cfg.Registerer,
			Published: prometheus.CounterOpts{
				Name: "trustmesh_policy_snapshots_total", Help: "AuthorizationPolicy snapshots published: the first load and every accepted change.",
			},
			Refused: prometheus.CounterOpts{
				Name: "trustmesh_policy_refusals_total", Help: "AuthorizationPolicy updates refused; the last good snapshot stays in force.",
			},
			Version: prometheus.GaugeOpts{
				Name: "trustmesh_policy_version", Help: "Version of the AuthorizationPolicy snapshot in force.",
			},
		},
	})
	if err != nil {
		return nil, err
	}
	return &Feed{feed: f, src: cfg.Policies}, nil
}

// Current returns the snapshot in force, nil before the first load.
func (f *Feed) Current() *Snapshot { return f.feed.Current() }

// Ready is closed once the first snapshot is published.
func (f *Feed) Ready() <-chan struct{} { return f.feed.Ready() }

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
	return f.feed.Watch(ctx, changed)
}

// Load reads and parses the source once and publishes the result if it is
// new. A source that does not parse is refused with an error wrapping
// ErrRefused, and the last good snapshot stays in force. Concurrent Loads
// run one after another, so versions follow the order of the reads.
func (f *Feed) Load() (*Snapshot, error) { return f.feed.Load() }

// Run watches the source, loads it (failing if the first load fails), then
// reloads once changes have settled, until ctx ends. A watch that ends
// while Run runs is an error.
func (f *Feed) Run(ctx context.Context) error { return f.feed.Run(ctx) }
