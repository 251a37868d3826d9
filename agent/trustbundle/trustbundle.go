// Package trustbundle follows the CA's trust-bundle stream and keeps the
// agent's bundle current, so that a new root reaches workloads before
// anything is signed under it.
package trustbundle

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/identity"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// ErrInvalidBundle: the CA sent a bundle the agent will not use.
var ErrInvalidBundle = errors.New("trustbundle: invalid bundle")

// Watcher is the CA's bundle stream.
type Watcher interface {
	// WatchBundle calls fn with each bundle until the stream ends, and
	// returns why it ended.
	WatchBundle(ctx context.Context, fn func(*cav1.TrustBundle) error) error
}

// Store is where the bundle goes.
type Store interface {
	Load() (identity.Snapshot, <-chan struct{})
	SetBundle(*x509bundle.Bundle)
}

// Config configures a Follower.
type Config struct {
	CA    Watcher
	Store Store
	Clock clock.Clock
	// Backoff paces reconnection after the stream breaks.
	Backoff backoff.Backoff
	Logger  *slog.Logger
	// Registerer receives the follower's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

// Follower keeps the store's bundle equal to the CA's.
type Follower struct {
	cfg     Config
	synced  atomic.Bool
	updates prometheus.Counter
	breaks  prometheus.Counter
	seq     prometheus.Gauge
}

// New returns a follower.
func New(cfg Config) (*Follower, error) {
	if cfg.CA == nil || cfg.Store == nil || cfg.Clock == nil {
		return nil, errors.New("trustbundle: CA, Store and Clock are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	f := &Follower{
		cfg: cfg,
		updates: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trustmesh_agent_bundle_updates_total",
			Help: "Trust bundle changes received from the CA.",
		}),
		breaks: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trustmesh_agent_bundle_stream_failures_total",
			Help: "Times the CA's bundle stream could not be opened or broke.",
		}),
		seq: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "trustmesh_agent_bundle_sequence_number",
			Help: "Sequence number of the last bundle received from the CA.",
		}),
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{f.updates, f.breaks, f.seq} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("trustbundle: register metrics: %w", err)
			}
		}
	}
	return f, nil
}

// Synced reports whether a bundle has been received from the CA since start.
// Until then the agent trusts its bootstrap bundle too.
func (f *Follower) Synced() bool { return f.synced.Load() }

// Run follows the stream until ctx ends, reconnecting with backoff. It
// returns ctx.Err().
func (f *Follower) Run(ctx context.Context) error {
	bo := f.cfg.Backoff
	for {
		received := false
		err := f.cfg.CA.WatchBundle(ctx, func(msg *cav1.TrustBundle) error {
			if err := f.apply(msg); err != nil {
				return err
			}
			if !received {
				received = true
				bo.Reset()
			}
			return nil
		})
		if ctx.Err() != nil {
			return ctx.Err()
		}
		f.breaks.Inc()
		delay := bo.Next()
		f.cfg.Logger.Warn("trust bundle stream ended, reconnecting", "error", err, "retry_in", delay)
		t := f.cfg.Clock.NewTimer(delay)
		select {
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		case <-t.C():
		}
	}
}

func (f *Follower) apply(msg *cav1.TrustBundle) error {
	bundle, err := Parse(msg)
	if err != nil {
		return err
	}
	snap, _ := f.cfg.Store.Load()
	if want, ok := trustDomain(snap); ok && bundle.TrustDomain() != want {
		return fmt.Errorf("%w: trust domain %q, want %q", ErrInvalidBundle, bundle.TrustDomain(), want)
	}
	f.seq.Set(float64(msg.GetSequenceNumber()))
	if snap.Bundle == nil || !snap.Bundle.Equal(bundle) {
		f.updates.Inc()
		f.cfg.Store.SetBundle(bundle)
		f.cfg.Logger.Info("trust bundle updated", "trust_domain", bundle.TrustDomain().Name(),
			"roots", len(bundle.X509Authorities()), "sequence", msg.GetSequenceNumber())
	}
	f.synced.Store(true)
	return nil
}

// trustDomain is the trust domain the agent already belongs to, if known.
func trustDomain(snap identity.Snapshot) (spiffeid.TrustDomain, bool) {
	switch {
	case snap.SVID != nil:
		return snap.SVID.ID.TrustDomain(), true
	case snap.Bundle != nil:
		return snap.Bundle.TrustDomain(), true
	}
	return spiffeid.TrustDomain{}, false
}

// Parse checks a streamed bundle and converts it: a valid trust domain and at
// least one root, every one a CA certificate.
func Parse(msg *cav1.TrustBundle) (*x509bundle.Bundle, error) {
	td, err := spiffeid.TrustDomainFromString(msg.GetTrustDomain())
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInvalidBundle, err)
	}
	if len(msg.GetX509Authorities()) == 0 {
		return nil, fmt.Errorf("%w: no X.509 authorities", ErrInvalidBundle)
	}
	roots := make([]*x509.Certificate, 0, len(msg.GetX509Authorities()))
	for _, der := range msg.GetX509Authorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: %w", ErrInvalidBundle, err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("%w: authority %q is not a CA", ErrInvalidBundle, c.Subject)
		}
		roots = append(roots, c)
	}
	return x509bundle.FromX509Authorities(td, roots), nil
}
