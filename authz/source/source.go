// Package source feeds the engine: it loads AuthorizationPolicies from a
// PolicySource (a watched YAML directory; Kubernetes informers plug in
// through the same interface) and Rego bundles (directories or .tar.gz),
// builds a complete engine.Set and swaps it in. An update that does not
// parse, validate or compile is refused with an error naming the file,
// object or bundle, and the last good set stays in force.
package source

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
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

// Policies parses every YAML file in the directory.
func (d *Dir) Policies() ([]*policy.Policy, error) {
	return policy.ParseDir(d.Path, d.DefaultNamespace)
}

// Watch reports changes to the directory's files.
func (d *Dir) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	return watchPaths(ctx, []string{d.Path}, changed)
}

// ErrRefused wraps every load failure: the update was refused and the
// previous set still serves.
var ErrRefused = errors.New("source: update refused, last good policy set kept")

// Config configures a Loader.
type Config struct {
	Engine *engine.Engine
	// Policies may be nil when only bundles are loaded.
	Policies      PolicySource
	Bundles       []BundleConfig
	RootNamespace string
	EvalTimeout   time.Duration
	// Gateways are the mesh's gateway identities (engine.SetConfig).
	Gateways engine.Gateways
	Log      *slog.Logger
	// OnLoad, if set, is called after every load attempt with its result.
	OnLoad func(error)
	// Settle is how long changes must stop before a reload, so that a file
	// caught half-written (an empty file is a valid, empty policy set) is
	// not loaded; zero means DefaultSettle.
	Settle time.Duration
	// Clock times Settle; nil means the real clock.
	Clock clock.WithTicker
}

// DefaultSettle is the default quiet period before a reload.
const DefaultSettle = 250 * time.Millisecond

// Validate checks the configuration, collecting every error.
func (c *Config) Validate() error {
	var errs []error
	if c.Engine == nil {
		errs = append(errs, errors.New("source: an engine is required"))
	}
	for _, b := range c.Bundles {
		errs = append(errs, b.Validate())
	}
	return errors.Join(errs...)
}

// Loader loads and hot-reloads the engine's policy set.
type Loader struct {
	cfg Config
	log *slog.Logger
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
	return &Loader{cfg: cfg, log: log}, nil
}

// Build reads every source and compiles a Set without swapping it in.
func (l *Loader) Build(ctx context.Context) (*engine.Set, error) {
	var ps []*policy.Policy
	if l.cfg.Policies != nil {
		var err error
		if ps, err = l.cfg.Policies.Policies(); err != nil {
			return nil, err
		}
	}
	var bs []engine.NamedBundle
	for _, bc := range l.cfg.Bundles {
		b, err := LoadBundle(bc)
		if err != nil {
			return nil, err
		}
		bs = append(bs, engine.NamedBundle{Name: bc.Path, Bundle: b})
	}
	return engine.Build(ctx, engine.SetConfig{
		RootNamespace: l.cfg.RootNamespace,
		Policies:      ps,
		Bundles:       bs,
		EvalTimeout:   l.cfg.EvalTimeout,
		Gateways:      l.cfg.Gateways,
	})
}

// Load builds a new Set and swaps it in. On error the engine keeps its
// current set and the error wraps ErrRefused.
func (l *Loader) Load(ctx context.Context) error {
	s, err := l.Build(ctx)
	if err != nil {
		err = fmt.Errorf("%w: %w", ErrRefused, err)
		l.log.Error("policy update refused; last good policy set kept", "error", err)
	} else {
		l.cfg.Engine.Swap(s)
		l.log.Info("policy set loaded", "policies", len(s.Policies()))
	}
	if l.cfg.OnLoad != nil {
		l.cfg.OnLoad(err)
	}
	return err
}

// Run loads once, failing if the first load fails, then reloads whenever a
// source changes until ctx ends.
func (l *Loader) Run(ctx context.Context) error {
	kick := make(chan struct{}, 1)
	changed := func() {
		select {
		case kick <- struct{}{}:
		default:
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
	if l.cfg.Policies != nil {
		c, err := l.cfg.Policies.Watch(ctx, changed)
		if err != nil {
			return fmt.Errorf("source: watching policies: %w", err)
		}
		forward(c)
	}
	if len(l.cfg.Bundles) > 0 {
		var paths []string
		for _, b := range l.cfg.Bundles {
			paths = append(paths, b.Path)
		}
		c, err := watchPaths(ctx, paths, changed)
		if err != nil {
			stopWatchers()
			return err
		}
		forward(c)
	}
	// The watches are in place before the first load, so no change between
	// the two is missed.
	if err := l.Load(ctx); err != nil {
		stopWatchers()
		return err
	}
	var (
		settle clock.Timer
		fire   <-chan time.Time
	)
	defer func() {
		if settle != nil {
			settle.Stop()
		}
	}()
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
		case <-kick:
			// Restart the quiet period on every change.
			if settle != nil {
				settle.Stop()
			}
			settle = l.cfg.Clock.NewTimer(l.cfg.Settle)
			fire = settle.C()
		case <-fire:
			settle, fire = nil, nil
			_ = l.Load(ctx) // refused updates are logged; the old set serves
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
