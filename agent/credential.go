package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/caclient"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/rotation"
	"github.com/trustmesh/trustmesh/agent/state"
	"github.com/trustmesh/trustmesh/agent/svid"
	"github.com/trustmesh/trustmesh/agent/trustbundle"
)

// CredentialConfig configures an agent's own credential: what the per-pod
// agent serves to its workload, and what the node agent authenticates to
// the CA with.
type CredentialConfig struct {
	// CAAddress is the CA's host:port; CAServerName the name its serving
	// certificate must carry (default the host of CAAddress).
	CAAddress    string
	CAServerName string
	// Bootstrap is trusted for the CA's serving certificate until the
	// CA's bundle stream has spoken.
	Bootstrap []*x509.Certificate
	// BundleOnly follows the bundle and holds no SVID: no rotation, no
	// state (the node agent on Kubernetes, which sends its token instead).
	BundleOnly bool
	// Token yields the bearer token for a first issuance; JoinToken says
	// it is a one-time join token (see rotation.Config).
	Token     rotation.TokenSource
	JoinToken bool
	// ID, if set, is the only identity accepted.
	ID      spiffeid.ID
	KeyType svid.KeyType
	TTL     time.Duration
	// StateDir, if set, persists the key, certificate and bundle.
	StateDir   string
	Clock      clock.Clock
	Logger     *slog.Logger
	Registerer prometheus.Registerer
}

// Credential is an agent's own identity, kept current: the store that holds
// it, the CA client that obtains it, the bundle follower, the rotation
// manager (nil when BundleOnly) and the state persister.
type Credential struct {
	Store    *identity.Store
	CA       *caclient.Client
	Follower *trustbundle.Follower
	Manager  *rotation.Manager

	bootstrap []*x509.Certificate
	parts     []part
}

// NewCredential restores a saved identity, if any, and wires the parts.
func NewCredential(cfg CredentialConfig) (*Credential, error) {
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := &Credential{Store: identity.New(), bootstrap: cfg.Bootstrap}
	var stateDir *state.Dir
	if cfg.StateDir != "" && !cfg.BundleOnly {
		d, err := state.Open(cfg.StateDir)
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		stateDir = d
		if err := restore(&cfg, d, c.Store); err != nil {
			return nil, err
		}
	}
	ca, err := caclient.New(caclient.Config{
		Address:    cfg.CAAddress,
		ServerName: cfg.CAServerName,
		Now:        cfg.Clock.Now,
		Roots:      c.Roots,
	})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	c.CA = ca
	// A bundle that marks the agent's issuer tainted renews it at once.
	var renew func(string)
	if !cfg.BundleOnly {
		renew = func(reason string) { c.Manager.RenewNow(reason) }
	}
	c.Follower, err = trustbundle.New(trustbundle.Config{
		CA: ca, Store: c.Store, Clock: cfg.Clock, Logger: cfg.Logger.With("component", "trustbundle"), Registerer: cfg.Registerer,
		Renew: renew,
	})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	c.parts = append(c.parts, part{"trust bundle", c.Follower.Run})
	if cfg.BundleOnly {
		return c, nil
	}
	c.Manager, err = rotation.New(rotation.Config{
		Issuer:     ca,
		Token:      cfg.Token,
		JoinToken:  cfg.JoinToken,
		Store:      c.Store,
		Clock:      cfg.Clock,
		KeyType:    cfg.KeyType,
		TTL:        cfg.TTL,
		ID:         cfg.ID,
		Backoff:    backoff.Backoff{Initial: time.Second, Max: time.Minute},
		Logger:     cfg.Logger.With("component", "rotation"),
		CA:         cfg.CAAddress,
		Registerer: cfg.Registerer,
	})
	if err != nil {
		return nil, fmt.Errorf("agent: %w", err)
	}
	c.parts = append(c.parts, part{"rotation", c.Manager.Run})
	if stateDir != nil {
		p, err := state.NewPersister(state.PersisterConfig{Dir: stateDir, Source: c.Store, Logger: cfg.Logger.With("component", "state")})
		if err != nil {
			return nil, fmt.Errorf("agent: %w", err)
		}
		c.parts = append(c.parts, part{"state", p.Run})
	}
	return c, nil
}

// Roots returns the roots to verify the CA's serving certificate with now:
// the bundle, and until the CA's stream has spoken the bootstrap roots too.
func (c *Credential) Roots() []*x509.Certificate {
	snap, _ := c.Store.Load()
	var roots []*x509.Certificate
	if snap.Bundle != nil {
		roots = snap.Bundle.X509Authorities()
	}
	if c.Follower != nil && c.Follower.Synced() {
		return roots
	}
	// Until the CA's stream has spoken, the operator's bootstrap bundle
	// is trusted too, beside any persisted one.
	return append(roots, c.bootstrap...)
}

// Part is one of the credential's parts, to be run beside the others.
type Part struct {
	Name string
	Run  func(context.Context) error
}

// Parts returns the credential's parts to run.
func (c *Credential) Parts() []Part {
	out := make([]Part, 0, len(c.parts))
	for _, p := range c.parts {
		out = append(out, Part{Name: p.name, Run: p.run})
	}
	return out
}

// restore puts a persisted identity into the store if it is still usable:
// it verifies under its saved bundle now and names the configured ID (any
// ID when none is configured, which it then becomes).
func restore(cfg *CredentialConfig, d *state.Dir, store *identity.Store) error {
	saved, bundle, err := d.Load()
	switch {
	case errors.Is(err, state.ErrEmpty):
		return nil
	case errors.Is(err, state.ErrInsecure), errors.Is(err, state.ErrCorrupt):
		// Never enrol again over a saved identity that cannot be read: that
		// would silently make this agent a new identity with a new key.
		return fmt.Errorf("agent: %w", err)
	case err != nil:
		cfg.Logger.Warn("ignoring unreadable saved identity", "dir", d.Path(), "error", err)
		return nil
	}
	got, err := svid.Verify(svid.VerifyRequest{
		Chain: saved.Certificates, Key: saved.PrivateKey, Bundle: bundle, Want: cfg.ID, Now: cfg.Clock.Now(),
	})
	if err != nil {
		cfg.Logger.Warn("ignoring saved identity", "dir", d.Path(), "error", err)
		return nil
	}
	store.SetBundle(bundle)
	store.SetSVID(got)
	if cfg.ID.IsZero() {
		cfg.ID = got.ID
	}
	cfg.Logger.Info("restored saved identity", "spiffe_id", got.ID.String(), "expires", svid.Expiry(got))
	return nil
}

// ReadBundleFile reads the PEM roots an operator gives to trust the CA with
// until its bundle stream takes over.
func ReadBundleFile(path string) ([]*x509.Certificate, error) {
	return readRoots(path)
}
