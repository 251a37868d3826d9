// Package source owns trustmesh's AuthorizationPolicies: the one place
// that loads, watches and parses them. A Feed reads a PolicySource (a
// watched YAML directory, or Kubernetes informers through the same
// interface) and publishes immutable, versioned Snapshots to every
// subscriber: the engine, through a Loader, and the xDS server. The Loader
// adds the Rego bundles (directories or .tar.gz), builds a complete
// engine.Set and swaps it in. An update that does not parse, validate or
// compile is refused with an error naming the file, object or bundle, and
// the last good snapshot and set stay in force.
package source

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/internal/run"
	"github.com/trustmesh/trustmesh/internal/watch"
)

// PolicySource provides AuthorizationPolicies.
type PolicySource interface {
	// Policies returns the current policies, or an error naming the file or
	// object at fault.
	Policies() ([]*policy.Policy, error)
	// Watch returns once the watch is in place, then calls changed whenever
	// the policies may have changed, until ctx ends. The channel receives
	// the watch's final error: nil when ctx ended.
	Watch(ctx context.Context, changed func()) (<-chan error, error)
}

// Dir is a directory of AuthorizationPolicy YAML files (local mode).
type Dir struct {
	Path string
	// DefaultNamespace is given to policies that name none.
	DefaultNamespace string
}

var _ PolicySource = (*Dir)(nil)

// Policies reads every policy file in the directory (ParseDir): a policy
// that does not parse, or that the engine refuses, refuses the update.
func (d *Dir) Policies() ([]*policy.Policy, error) {
	return ParseDir(d.Path, d.DefaultNamespace)
}

// Watch reports changes to the directory's files.
func (d *Dir) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	return watchPaths(ctx, []string{d.Path}, changed)
}

// ErrRefused wraps every load failure. After a first good load the update
// is refused and the last good set still serves; before one, the failure
// also wraps ErrStartRefused: there is no set to keep, so the start fails.
var ErrRefused = errors.New("source: policy set refused")

// ErrStartRefused wraps (with ErrRefused) a failure of the first load: no
// policy set has loaded, so nothing could serve and a start is refused. Its
// words fit every command that loads policies, the offline ones too
// (trustmesh policy check); a start logs that it is refused.
var ErrStartRefused = errors.New("no policy set has loaded")

// refusal wraps a load failure in ErrRefused and says what follows from
// it: the last good set stays, or, when there is none (first), the start
// is refused.
func refusal(err error, first bool) error {
	if first {
		return fmt.Errorf("%w; %w: %w", ErrRefused, ErrStartRefused, err)
	}
	return fmt.Errorf("%w; the last good policy set is kept: %w", ErrRefused, err)
}

// logRefusal logs a refusal made by refusal.
func logRefusal(log *slog.Logger, err error) {
	if errors.Is(err, ErrStartRefused) {
		log.Error("policy set refused; none has loaded, so the start is refused", "error", err)
		return
	}
	log.Error("policy update refused; last good policy set kept", "error", err)
}

// Config configures a Loader.
type Config struct {
	Engine *engine.Engine
	// Feed is the policy feed whose snapshots the engine compiles, shared
	// with the feed's other subscribers; whoever built it runs it.
	// Policies, instead, is a source the Loader feeds from on its own
	// (`trustmesh authz`, tests). Both may be nil when only bundles are
	// loaded.
	Feed     *Feed
	Policies PolicySource
	Bundles  []BundleConfig
	// RootNamespace, EvalTimeout and Gateways are as engine.SetConfig.
	RootNamespace string
	EvalTimeout   time.Duration
	Gateways      engine.Gateways
	Log           *slog.Logger
	// OnLoad, if set, is called after every load attempt with its result,
	// including the policy updates the Loader's own feed refuses.
	OnLoad func(error)
	// Settle is how long changes must stop before a reload, so that a file
	// caught half-written (an empty file is a valid, empty policy set) is
	// not loaded; zero means DefaultSettle.
	Settle time.Duration
	// Clock times Settle; nil means the real clock.
	Clock clock.WithTicker
	// Registerer, when set, receives the metrics of the feed the Loader
	// builds from Policies (FeedConfig.Registerer).
	Registerer prometheus.Registerer
}

// DefaultSettle is the default quiet period before a reload.
const DefaultSettle = 250 * time.Millisecond

// Validate checks the configuration, collecting every error.
func (c *Config) Validate() error {
	var errs []error
	if c.Engine == nil {
		errs = append(errs, errors.New("source: an engine is required"))
	}
	if c.Feed != nil && c.Policies != nil {
		errs = append(errs, errors.New("source: set a policy feed or a policy source, not both"))
	}
	for _, b := range c.Bundles {
		errs = append(errs, b.Validate())
	}
	return errors.Join(errs...)
}

// Loader compiles the engine's policy set from the feed's snapshots and
// the Rego bundles, and swaps it in whenever either changes. A set that
// does not compile never replaces the last good one.
type Loader struct {
	cfg  Config
	log  *slog.Logger
	feed *Feed
	// ownFeed is a feed the Loader built from cfg.Policies and runs.
	ownFeed bool
}

// New validates cfg and returns a Loader.
func New(cfg Config) (*Loader, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.Settle <= 0 {
		cfg.Settle = DefaultSettle
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	log := cfg.Log
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	l := &Loader{cfg: cfg, log: log, feed: cfg.Feed}
	if cfg.Policies != nil {
		f, err := NewFeed(FeedConfig{Policies: cfg.Policies, Settle: cfg.Settle, Clock: cfg.Clock, Log: log,
			Registerer: cfg.Registerer, onRefused: l.refused})
		if err != nil {
			return nil, err
		}
		l.feed, l.ownFeed = f, true
	}
	return l, nil
}

func (l *Loader) refused(err error) {
	if l.cfg.OnLoad != nil {
		l.cfg.OnLoad(err)
	}
}

// Build reads the Loader's own policy source, if it has one, and compiles
// the snapshot in force and the bundles into a Set without swapping it in.
func (l *Loader) Build(ctx context.Context) (*engine.Set, error) {
	if l.ownFeed {
		if _, err := l.feed.Load(); err != nil {
			return nil, err
		}
	}
	return l.build(ctx)
}

// build compiles the snapshot in force and the bundles into a Set.
func (l *Loader) build(ctx context.Context) (*engine.Set, error) {
	sc := engine.SetConfig{
		RootNamespace: l.cfg.RootNamespace,
		EvalTimeout:   l.cfg.EvalTimeout,
		Gateways:      l.cfg.Gateways,
	}
	if l.feed != nil {
		snap := l.feed.Current()
		if snap == nil {
			return nil, errors.New("source: no policy snapshot yet")
		}
		sc.Policies, sc.PolicyVersion, sc.PolicyDigest = snap.Policies, snap.Version, snap.Digest
	}
	for _, bc := range l.cfg.Bundles {
		b, err := LoadBundle(bc)
		if err != nil {
			return nil, err
		}
		sc.Bundles = append(sc.Bundles, engine.NamedBundle{Name: bc.Path, Bundle: b})
	}
	s, err := engine.Build(ctx, sc)
	if err != nil {
		return nil, l.missingBundleHint(err)
	}
	return s, nil
}

// Load reloads the Loader's own policy source, if it has one, then builds
// a new Set and swaps it in. On error the engine keeps its current set and
// the error wraps ErrRefused.
func (l *Loader) Load(ctx context.Context) error {
	if l.ownFeed {
		if _, err := l.feed.Load(); err != nil {
			return err // reported by refused
		}
	}
	return l.apply(ctx)
}

// apply builds a Set from the snapshot in force and swaps it in.
func (l *Loader) apply(ctx context.Context) error {
	s, err := l.build(ctx)
	if err != nil {
		err = refusal(err, l.cfg.Engine.Current() == nil)
		logRefusal(l.log, err)
	} else {
		l.cfg.Engine.Swap(s)
		l.log.Info("policy set loaded", "policies", len(s.Policies()), "policy_version", s.PolicyVersion())
	}
	if l.cfg.OnLoad != nil {
		l.cfg.OnLoad(err)
	}
	return err
}

// Run loads once, failing if the first load fails, then reloads whenever
// the feed publishes or a bundle changes, until ctx ends. A Loader that
// built its own feed runs it too.
func (l *Loader) Run(ctx context.Context) error {
	if !l.ownFeed {
		return l.follow(ctx)
	}
	err := run.Tasks(ctx, l.feed.Run, l.follow)
	if errors.Is(err, context.Canceled) && ctx.Err() != nil {
		return nil
	}
	return err
}

// follow subscribes to the feed and watches the bundles, and applies every
// change: a new snapshot at once (the feed has settled it), bundle changes
// once they have settled.
func (l *Loader) follow(ctx context.Context) error {
	policyKick := make(chan struct{}, 1)
	bundleKick := make(chan struct{}, 1)
	kicker := func(c chan struct{}) func() {
		return func() {
			select {
			case c <- struct{}{}:
			default:
			}
		}
	}
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	errc := make(chan error, 2)
	watchers := 0
	forward := func(c <-chan error) {
		watchers++
		go func() { errc <- <-c }()
	}
	stopWatchers := func() {
		cancel()
		for range watchers {
			<-errc
		}
	}
	if len(l.cfg.Bundles) > 0 {
		var paths []string
		for _, b := range l.cfg.Bundles {
			paths = append(paths, b.Path)
		}
		c, err := watchPaths(ctx, paths, kicker(bundleKick))
		if err != nil {
			return err
		}
		forward(c)
	}
	if l.feed != nil {
		// Returns once the feed's first snapshot is out.
		c, err := l.feed.Watch(ctx, kicker(policyKick))
		if err != nil {
			stopWatchers()
			return err
		}
		forward(c)
	}
	// The watches are in place before the first load, so no change between
	// the two is missed.
	if err := l.apply(ctx); err != nil {
		stopWatchers()
		return err
	}
	settle := watch.NewSettle(l.cfg.Clock, l.cfg.Settle)
	defer settle.Stop()
	for {
		select {
		case <-ctx.Done():
			stopWatchers()
			return nil
		case err := <-errc:
			watchers--
			if err != nil {
				stopWatchers()
				return fmt.Errorf("source: watching: %w", err)
			}
		case <-policyKick:
			_ = l.apply(ctx) // refused sets are logged; the old set serves
		case <-bundleKick:
			settle.Kick()
		case <-settle.C():
			settle.Fired()
			_ = l.apply(ctx)
		}
	}
}

// watchPaths watches files and directory trees (internal/watch).
func watchPaths(ctx context.Context, paths []string, changed func()) (<-chan error, error) {
	done, err := watch.Paths(ctx, paths, changed)
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	return done, nil
}
