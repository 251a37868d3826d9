// Package rotation obtains the agent's X.509-SVID from the CA and keeps it
// fresh. It generates a new key for every certificate, renews over mTLS with
// the current certificate at half its lifetime (±10% jitter), retries with
// capped exponential backoff while the CA cannot be reached, keeps the current
// certificate in service while it is valid, and refuses any certificate that
// does not verify or names another identity than the agent's own.
//
// The agent's identity is pinned the first time it is known: from
// Config.ID when the operator names it, from the persisted certificate after
// a restart, or else from the first certificate the CA issues for the
// bearer token. Every later certificate must carry exactly that ID.
package rotation

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/svid"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/internal/serial"
)

// ErrNoCredential: the agent has neither a valid certificate to renew with
// nor a token to be issued one.
var ErrNoCredential = errors.New("rotation: no credential to authenticate to the CA")

// Issuer is the CA's issuance API.
type Issuer interface {
	// IssueWithToken asks for a certificate authenticated by a bearer token.
	IssueWithToken(ctx context.Context, token string, csrPEM []byte, ttl time.Duration) ([]*x509.Certificate, error)
	// Renew asks for a certificate authenticated by the current one over mTLS.
	Renew(ctx context.Context, current tls.Certificate, csrPEM []byte, ttl time.Duration) ([]*x509.Certificate, error)
}

// TokenSource yields the bearer token for a first issuance. It is asked at
// every use, so a projected service-account token that the kubelet refreshes
// is always current.
type TokenSource interface {
	Token() (string, error)
}

// Store holds the current SVID and bundle.
type Store interface {
	Load() (identity.Snapshot, <-chan struct{})
	SetSVID(*x509svid.SVID)
}

// Config configures a Manager.
type Config struct {
	Issuer Issuer
	// Token may be nil when the agent starts with a persisted certificate;
	// it then cannot recover once that certificate expires.
	Token TokenSource
	// JoinToken says Token is a one-time join token. The CA's refusal of
	// one, with its api/ca/v1 reason, is final, unlike that of a
	// service-account token that the kubelet refreshes: the manager stops
	// with a JoinTokenRefusedError once it has no valid certificate left
	// to serve.
	JoinToken bool
	Store     Store
	Clock     clock.Clock
	// KeyType is the type of every generated key; default svid.ECP256.
	KeyType svid.KeyType
	// TTL is the lifetime asked of the CA; zero lets the CA choose.
	TTL time.Duration
	// ID is the agent's SPIFFE ID, if known before the first issuance.
	ID spiffeid.ID
	// Backoff paces retries while issuance fails.
	Backoff backoff.Backoff
	// CallTimeout bounds one call to the CA; default 30s.
	CallTimeout time.Duration
	// Rand returns a uniform value in [0, 1) for the renewal jitter;
	// default math/rand/v2.Float64.
	Rand   func() float64
	Logger *slog.Logger
	// CA names the CA (its address) in what Health says; optional.
	CA string
	// Registerer receives the manager's metrics; nil registers nowhere.
	Registerer prometheus.Registerer
}

// Manager keeps the store's SVID current.
type Manager struct {
	cfg Config

	mu sync.Mutex
	id spiffeid.ID

	// scheduled is the SVID whose renewal time is renewAt.
	scheduled *x509svid.SVID
	renewAt   time.Time

	// forced counts RenewNow calls and renewed the count the last renewal
	// answered; kick wakes Run (capacity 1, sent without blocking).
	forced, renewed uint64
	forceWhy        string
	kick            chan struct{}

	// enrolled is set once the agent has held a certificate: a join token
	// is spent from then on. expired is the expiry of the last certificate
	// withdrawn unrenewed; failingSince and lastErr are when the current
	// run of failed attempts to reach the CA began and its latest error.
	// A successful rotation clears all but enrolled (Health).
	enrolled     bool
	expired      time.Time
	failingSince time.Time
	lastErr      error

	rotations prometheus.Counter
	failures  *prometheus.CounterVec
}

// JoinTokenRefusedError: the CA refused the agent's join token, which will
// never work: it is malformed, unknown, used, expired or revoked. Reason is
// the CA's api/ca/v1 JoinToken* reason; a refusal without one is not this
// error but a failure the manager retries, since it may pass (a CA
// restarting, a CSR problem).
type JoinTokenRefusedError struct {
	Reason string
	Err    error
}

func (e *JoinTokenRefusedError) Error() string {
	what := map[string]string{
		cav1.JoinTokenMalformed: "it is malformed (was it copied whole, without quotes?)",
		cav1.JoinTokenUnknown:   "this CA never created it",
		cav1.JoinTokenUsed:      "it was used already, and works once",
		cav1.JoinTokenExpired:   "it expired before it was used",
		cav1.JoinTokenRevoked:   "its identity was revoked",
	}[e.Reason]
	if what == "" {
		what = "reason " + e.Reason
	}
	return fmt.Sprintf("rotation: the CA refused the join token: %s; the agent needs a new join token: create one with "+
		"`trustmesh ca token create --data-dir <the CA's data dir> --spiffe-id <this workload's SPIFFE ID>` "+
		"and start the agent with it: %v", what, e.Err)
}

func (e *JoinTokenRefusedError) Unwrap() error { return e.Err }

// Failure reasons, the label values of trustmesh_agent_rotation_failures_total.
const (
	ReasonUnavailable      = "ca_unavailable"
	ReasonRefused          = "refused"
	ReasonIdentityMismatch = "identity_mismatch"
	ReasonInvalid          = "invalid_certificate"
	ReasonNoCredential     = "no_credential"
	ReasonOther            = "other"
)

// New checks cfg and returns a manager.
func New(cfg Config) (*Manager, error) {
	var errs []error
	if cfg.Issuer == nil {
		errs = append(errs, errors.New("rotation: Issuer is required"))
	}
	if cfg.Store == nil {
		errs = append(errs, errors.New("rotation: Store is required"))
	}
	if cfg.Clock == nil {
		errs = append(errs, errors.New("rotation: Clock is required"))
	}
	if cfg.TTL < 0 {
		errs = append(errs, fmt.Errorf("rotation: negative TTL %s", cfg.TTL))
	}
	if cfg.KeyType == "" {
		cfg.KeyType = svid.ECP256
	} else if _, err := svid.ParseKeyType(string(cfg.KeyType)); err != nil {
		errs = append(errs, fmt.Errorf("rotation: %w", err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	if cfg.CallTimeout <= 0 {
		cfg.CallTimeout = 30 * time.Second
	}
	if cfg.Rand == nil {
		cfg.Rand = rand.Float64
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	m := &Manager{
		cfg:  cfg,
		id:   cfg.ID,
		kick: make(chan struct{}, 1),
		rotations: prometheus.NewCounter(prometheus.CounterOpts{
			Name: "trustmesh_agent_rotations_total",
			Help: "Certificates obtained from the CA, the first issuance included.",
		}),
		failures: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_agent_rotation_failures_total",
			Help: "Failed attempts to obtain a certificate, by reason.",
		}, []string{"reason"}),
	}
	for _, r := range []string{ReasonUnavailable, ReasonRefused, ReasonIdentityMismatch, ReasonInvalid, ReasonNoCredential, ReasonOther} {
		m.failures.WithLabelValues(r)
	}
	if cfg.Registerer != nil {
		for _, c := range []prometheus.Collector{m.rotations, m.failures} {
			if err := cfg.Registerer.Register(c); err != nil {
				return nil, fmt.Errorf("rotation: register metrics: %w", err)
			}
		}
	}
	return m, nil
}

// ID returns the agent's SPIFFE ID, zero until known.
func (m *Manager) ID() spiffeid.ID {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.id
}

// RenewNow asks Run to renew the certificate at once rather than at its
// renewal time, e.g. because its issuer is tainted. It does not block; the
// request stands until a renewal succeeds after it, failed attempts being
// retried with the usual backoff.
func (m *Manager) RenewNow(reason string) {
	m.mu.Lock()
	m.forced++
	m.forceWhy = reason
	m.mu.Unlock()
	select {
	case m.kick <- struct{}{}:
	default:
	}
}

// pendingRenewal returns the RenewNow count and its last reason if a
// renewal was asked that none has answered yet.
func (m *Manager) pendingRenewal() (uint64, string, bool) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.forced, m.forceWhy, m.forced != m.renewed
}

// Run keeps the SVID current until ctx ends, and returns ctx.Err().
func (m *Manager) Run(ctx context.Context) error {
	bo := m.cfg.Backoff
	for {
		snap, changed := m.cfg.Store.Load()
		now := m.cfg.Clock.Now()
		seq, why, forced := m.pendingRenewal()
		var (
			wait  time.Duration
			wake  <-chan struct{}
			renew = true
		)
		switch {
		case snap.Bundle == nil:
			// Nothing can be verified before the bundle stream delivers.
			renew, wake = false, changed
		case snap.SVID != nil && !now.Before(svid.Expiry(snap.SVID)):
			m.mu.Lock()
			m.enrolled, m.expired = true, svid.Expiry(snap.SVID)
			m.mu.Unlock()
			m.cfg.Logger.Error("certificate expired without renewal; withdrawing it",
				"spiffe_id", snap.SVID.ID.String(), "expired", svid.Expiry(snap.SVID), "why", m.Health())
			m.cfg.Store.SetSVID(nil)
			continue
		case snap.SVID != nil:
			renewAt := m.renewalTime(snap.SVID)
			if forced {
				m.cfg.Logger.Info("renewing at once", "reason", why, "spiffe_id", snap.SVID.ID.String())
			} else if now.Before(renewAt) {
				renew, wait = false, renewAt.Sub(now)
			}
		}
		if renew {
			err := m.rotate(ctx, snap)
			if err == nil {
				m.mu.Lock()
				m.renewed = max(m.renewed, seq)
				m.enrolled, m.expired, m.failingSince, m.lastErr = true, time.Time{}, time.Time{}, nil
				m.mu.Unlock()
				bo.Reset()
				continue
			}
			if ctx.Err() != nil {
				return ctx.Err()
			}
			reason := classify(err)
			m.failures.WithLabelValues(reason).Inc()
			m.mu.Lock()
			if m.failingSince.IsZero() {
				m.failingSince = now
			}
			m.lastErr = err
			if snap.SVID != nil {
				m.enrolled = true
			}
			m.mu.Unlock()
			var refused *JoinTokenRefusedError
			if errors.As(err, &refused) && snap.SVID == nil {
				// Retrying cannot help, and nothing is left to serve.
				m.cfg.Logger.Error("the CA refused the join token; stopping", "reason", refused.Reason, "error", err)
				return err
			}
			wait = bo.Next()
			if snap.SVID != nil {
				wait = min(wait, svid.Expiry(snap.SVID).Sub(now))
			}
			m.cfg.Logger.Warn("certificate rotation failed", "reason", reason, "error", err,
				"retry_in", wait, "serving_current", snap.SVID != nil)
		}
		if err := m.sleep(ctx, wait, wake); err != nil {
			return err
		}
	}
}

// NeedsJoinToken is what Health says of an agent enrolled by a join token
// that has no valid certificate left: its token was spent on its first
// certificate, and nothing else can get it another.
const NeedsJoinToken = "needs a new join token"

// Health is nil while the agent holds a certificate valid now, and
// otherwise says why it does not, for /healthz and the log: since when its
// certificate expired, since when and why the CA could not be reached (or
// refused), and, for an agent enrolled by a join token, that it needs a
// new one. For example: "certificate expired at 2026-12-06T03:00:00Z; the
// CA at ca.example:8443 unreachable since 2026-12-06T02:30:00Z: rpc error:
// ...".
func (m *Manager) Health() error {
	snap, _ := m.cfg.Store.Load()
	now := m.cfg.Clock.Now()
	if snap.SVID != nil && now.Before(svid.Expiry(snap.SVID)) {
		return nil
	}
	m.mu.Lock()
	enrolled, expired, since, lastErr := m.enrolled, m.expired, m.failingSince, m.lastErr
	m.mu.Unlock()
	if snap.SVID != nil {
		enrolled, expired = true, svid.Expiry(snap.SVID)
	}
	var parts []string
	switch {
	case snap.Bundle == nil:
		parts = append(parts, "no trust bundle yet")
	case !expired.IsZero():
		parts = append(parts, "certificate expired at "+expired.UTC().Format(time.RFC3339))
	default:
		parts = append(parts, "no certificate yet")
	}
	if lastErr != nil {
		ca := "the CA"
		if m.cfg.CA != "" {
			ca += " at " + m.cfg.CA
		}
		how := "unreachable"
		if classify(lastErr) != ReasonUnavailable {
			how = "failing"
		}
		parts = append(parts, fmt.Sprintf("%s %s since %s: %v", ca, how, since.UTC().Format(time.RFC3339), lastErr))
	}
	if m.cfg.JoinToken && enrolled {
		parts = append(parts, NeedsJoinToken+": the one it started with was spent on its first certificate")
	}
	return errors.New(strings.Join(parts, "; "))
}

// sleep waits for d on the clock (if d > 0), for wake (if not nil), for
// RenewNow, or for ctx.
func (m *Manager) sleep(ctx context.Context, d time.Duration, wake <-chan struct{}) error {
	var tc <-chan time.Time
	if d > 0 {
		t := m.cfg.Clock.NewTimer(d)
		defer t.Stop()
		tc = t.C()
	} else if wake == nil {
		return nil
	}
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-tc:
	case <-wake:
	case <-m.kick:
	}
	return nil
}

// renewalTime returns when s is due for renewal: at half its lifetime,
// moved by up to ±10% of that half, drawn once per certificate.
func (m *Manager) renewalTime(s *x509svid.SVID) time.Time {
	if m.scheduled != s {
		leaf := s.Certificates[0]
		half := svid.Expiry(s).Sub(leaf.NotBefore) / 2
		jitter := time.Duration((2*m.cfg.Rand() - 1) * 0.1 * float64(half))
		m.scheduled, m.renewAt = s, leaf.NotBefore.Add(half+jitter)
		m.cfg.Logger.Info("certificate renewal scheduled", "spiffe_id", s.ID.String(),
			"renew_at", m.renewAt, "expires", svid.Expiry(s))
	}
	return m.renewAt
}

// rotate obtains, verifies and stores a new SVID.
func (m *Manager) rotate(ctx context.Context, snap identity.Snapshot) error {
	key, err := svid.GenerateKey(m.cfg.KeyType)
	if err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	want := m.ID()
	csr, err := svid.NewCSR(key, want)
	if err != nil {
		return fmt.Errorf("rotation: %w", err)
	}
	chain, err := m.issue(ctx, snap.SVID, csr)
	if err != nil {
		return err
	}
	// Verify against the bundle as it is now: it may have changed during
	// the call.
	latest, _ := m.cfg.Store.Load()
	got, err := svid.Verify(svid.VerifyRequest{
		Chain: chain, Key: key, Bundle: latest.Bundle, Want: want, Now: m.cfg.Clock.Now(),
	})
	if err != nil {
		return fmt.Errorf("rotation: refusing certificate from the CA: %w", err)
	}
	if want.IsZero() {
		m.mu.Lock()
		m.id = got.ID
		m.mu.Unlock()
		m.cfg.Logger.Info("identity learned from first issuance", "spiffe_id", got.ID.String())
	}
	m.cfg.Store.SetSVID(got)
	m.rotations.Inc()
	m.cfg.Logger.Info("certificate rotated", "spiffe_id", got.ID.String(),
		"serial", serial.Format(got.Certificates[0].SerialNumber), "expires", svid.Expiry(got))
	return nil
}

// issue renews with the current certificate when there is one. When there is
// none, or the CA refuses the renewal, it falls back to the bearer token.
func (m *Manager) issue(ctx context.Context, current *x509svid.SVID, csr []byte) ([]*x509.Certificate, error) {
	ctx, cancel := context.WithTimeout(ctx, m.cfg.CallTimeout)
	defer cancel()
	var renewErr error
	if current != nil {
		chain, err := m.cfg.Issuer.Renew(ctx, tlsCertificate(current), csr, m.cfg.TTL)
		if err == nil {
			return chain, nil
		}
		if c := status.Code(err); m.cfg.Token == nil || (c != codes.Unauthenticated && c != codes.PermissionDenied) {
			return nil, fmt.Errorf("rotation: renew: %w", err)
		}
		renewErr = err
		m.cfg.Logger.Warn("renewal refused; trying the bearer token", "error", err)
	}
	if m.cfg.Token == nil {
		return nil, ErrNoCredential
	}
	token, err := m.cfg.Token.Token()
	if err != nil {
		return nil, errors.Join(renewErr, fmt.Errorf("%w: %w", ErrNoCredential, err))
	}
	chain, err := m.cfg.Issuer.IssueWithToken(ctx, token, csr, m.cfg.TTL)
	if err != nil {
		// Only the CA's own word that the join token is refused stops the
		// agent; any other refusal is retried like an outage.
		if c := status.Code(err); m.cfg.JoinToken && (c == codes.Unauthenticated || c == codes.PermissionDenied) {
			if reason, ok := cav1.RefusalReason(err); ok {
				return nil, errors.Join(renewErr, &JoinTokenRefusedError{Reason: reason, Err: err})
			}
		}
		return nil, fmt.Errorf("rotation: issue with token: %w", err)
	}
	return chain, nil
}

func tlsCertificate(s *x509svid.SVID) tls.Certificate {
	der := make([][]byte, len(s.Certificates))
	for i, c := range s.Certificates {
		der[i] = c.Raw
	}
	return tls.Certificate{Certificate: der, PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
}

func classify(err error) string {
	switch {
	case errors.Is(err, svid.ErrIdentityMismatch):
		return ReasonIdentityMismatch
	case errors.Is(err, svid.ErrUntrusted), errors.Is(err, svid.ErrKeyMismatch):
		return ReasonInvalid
	case errors.Is(err, ErrNoCredential):
		return ReasonNoCredential
	}
	switch status.Code(err) {
	case codes.Unavailable, codes.DeadlineExceeded:
		return ReasonUnavailable
	case codes.Unauthenticated, codes.PermissionDenied:
		return ReasonRefused
	}
	return ReasonOther
}

// FileToken reads the token from a file at every use, like a projected
// service-account token that the kubelet rewrites.
type FileToken string

// Token returns the file's content without surrounding white space.
func (f FileToken) Token() (string, error) {
	b, err := os.ReadFile(string(f))
	if err != nil {
		return "", fmt.Errorf("rotation: read token: %w", err)
	}
	tok := strings.TrimSpace(string(b))
	if tok == "" {
		return "", fmt.Errorf("rotation: token file %s is empty", string(f))
	}
	return tok, nil
}

// StaticToken is a token held in memory, e.g. from the environment.
type StaticToken string

// Token returns the token.
func (s StaticToken) Token() (string, error) {
	if s == "" {
		return "", errors.New("rotation: empty token")
	}
	return string(s), nil
}
