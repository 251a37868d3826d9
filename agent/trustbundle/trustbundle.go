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
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
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
	// Renew, when set, is asked (once per certificate) to renew the
	// agent's certificate at once when the bundle marks an authority it
	// chains through as tainted: the rotation Manager's RenewNow.
	Renew func(reason string)
}

// Follower keeps the store's bundle equal to the CA's.
type Follower struct {
	cfg    Config
	synced atomic.Bool
	// tainted is the bundle's tainted authorities; taintKick (capacity 1)
	// wakes watchTaint when they change.
	tainted   atomic.Pointer[[]*x509.Certificate]
	taintKick chan struct{}
	updates   prometheus.Counter
	breaks    prometheus.Counter
	seq       prometheus.Gauge
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
		cfg:       cfg,
		taintKick: make(chan struct{}, 1),
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
	if f.cfg.Renew != nil {
		wctx, cancel := context.WithCancel(ctx)
		done := make(chan struct{})
		go func() {
			defer close(done)
			f.watchTaint(wctx)
		}()
		defer func() {
			cancel()
			<-done
		}()
	}
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
	tainted, err := ParseTainted(msg)
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
	if old := f.tainted.Swap(&tainted); old == nil || !sameCerts(*old, tainted) {
		select {
		case f.taintKick <- struct{}{}:
		default:
		}
	}
	f.synced.Store(true)
	return nil
}

func sameCerts(a, b []*x509.Certificate) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if !a[i].Equal(b[i]) {
			return false
		}
	}
	return true
}

// watchTaint asks for a renewal at once whenever the agent's certificate
// chains through a tainted authority: when the bundle marks one, and when
// the certificate changes (a restart restoring one, or a renewal answered
// before the CA switched). It asks once per certificate, so that a CA that
// has not switched yet is not asked in a loop; the next certificate is
// judged afresh.
func (f *Follower) watchTaint(ctx context.Context) {
	var asked *x509svid.SVID
	for {
		snap, changed := f.cfg.Store.Load()
		if s := snap.SVID; s != nil && s != asked {
			var tainted []*x509.Certificate
			if p := f.tainted.Load(); p != nil {
				tainted = *p
			}
			if c := ChainsThrough(s.Certificates, tainted); c != nil {
				asked = s
				f.cfg.Logger.Warn("the certificate chains through a tainted CA; renewing at once",
					"spiffe_id", s.ID.String(), "tainted", c.SerialNumber.Text(16), "expires", s.Certificates[0].NotAfter.Format(time.RFC3339))
				f.cfg.Renew("issuer tainted: " + c.SerialNumber.Text(16))
			}
		}
		select {
		case <-ctx.Done():
			return
		case <-changed:
		case <-f.taintKick:
		}
	}
}

// ChainsThrough returns the tainted authority that chain (a leaf and its
// intermediates) passes through: one of its certificates, or the root that
// signed its last one; nil when none.
func ChainsThrough(chain, tainted []*x509.Certificate) *x509.Certificate {
	if len(chain) == 0 {
		return nil
	}
	top := chain[len(chain)-1]
	for _, t := range tainted {
		for _, c := range chain {
			if c.Equal(t) {
				return t
			}
		}
		if t.IsCA && top.CheckSignatureFrom(t) == nil {
			return t
		}
	}
	return nil
}

// ParseTainted returns the bundle's tainted authorities, each a CA
// certificate.
func ParseTainted(msg *cav1.TrustBundle) ([]*x509.Certificate, error) {
	var out []*x509.Certificate
	for _, der := range msg.GetTaintedAuthorities() {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			return nil, fmt.Errorf("%w: tainted authority: %w", ErrInvalidBundle, err)
		}
		if !c.IsCA {
			return nil, fmt.Errorf("%w: tainted authority %q is not a CA", ErrInvalidBundle, c.Subject)
		}
		out = append(out, c)
	}
	return out, nil
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
