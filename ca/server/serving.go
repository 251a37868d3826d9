package server

import (
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"log/slog"
	"net"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/keyutil"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca"
)

// ServingIssuer mints certificates for trustmesh's own servers.
type ServingIssuer interface {
	IssueServing(ctx context.Context, req ca.ServingRequest) (*ca.Issued, error)
}

// ServingCertConfig configures a ServingCert.
type ServingCertConfig struct {
	Issuer   ServingIssuer
	ID       spiffeid.ID
	DNSNames []string
	IPs      []net.IP
	// TTL of each serving certificate. Default 24h; renewed at half-life.
	TTL   time.Duration
	Clock clock.PassiveClock
	Log   *slog.Logger
	// Issuing, when set, returns the CA certificate in force; the serving
	// certificate is renewed as soon as it changes, so that after a
	// rotation it never chains to a root that is leaving the bundle.
	Issuing func() *x509.Certificate
}

// ServingCert is a TLS certificate for trustmesh's own servers, issued by the
// CA itself and renewed at half its lifetime, when a handshake finds it due.
// Its key never leaves memory.
type ServingCert struct {
	cfg ServingCertConfig
	key crypto.Signer

	mu       sync.Mutex
	current  *tls.Certificate
	renewAt  time.Time
	issuedBy *x509.Certificate
}

// NewServingCert issues the first certificate, so that a server never starts
// without one.
func NewServingCert(ctx context.Context, cfg ServingCertConfig) (*ServingCert, error) {
	if cfg.TTL <= 0 {
		cfg.TTL = 24 * time.Hour
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	key, err := keyutil.GenerateSigner("EC", "P-256", 0)
	if err != nil {
		return nil, fmt.Errorf("server: serving key: %w", err)
	}
	s := &ServingCert{cfg: cfg, key: key}
	if err := s.renew(ctx); err != nil {
		return nil, err
	}
	return s, nil
}

func (s *ServingCert) renew(ctx context.Context) error {
	issued, err := s.cfg.Issuer.IssueServing(ctx, ca.ServingRequest{
		ID: s.cfg.ID, DNSNames: s.cfg.DNSNames, IPs: s.cfg.IPs, PublicKey: s.key.Public(), TTL: s.cfg.TTL,
	})
	if err != nil {
		return fmt.Errorf("server: issue serving certificate: %w", err)
	}
	cert := &tls.Certificate{PrivateKey: s.key, Leaf: issued.Leaf}
	for _, c := range append([]*x509.Certificate{issued.Leaf}, issued.Chain...) {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	life := issued.Leaf.NotAfter.Sub(issued.Leaf.NotBefore)
	s.current, s.renewAt, s.issuedBy = cert, issued.Leaf.NotBefore.Add(life/2), issued.Chain[0]
	return nil
}

// Certificate returns the certificate in force, renewing it first when it is
// past half its life. A failed renewal keeps the current one while it is
// valid.
func (s *ServingCert) Certificate(ctx context.Context) (*tls.Certificate, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.cfg.Clock.Now()
	rotated := s.cfg.Issuing != nil && !s.cfg.Issuing().Equal(s.issuedBy)
	if rotated || !now.Before(s.renewAt) {
		if err := s.renew(ctx); err != nil {
			if now.Before(s.current.Leaf.NotAfter) {
				s.cfg.Log.Error("could not renew the serving certificate; keeping the current one", "error", err,
					"not_after", s.current.Leaf.NotAfter)
				return s.current, nil
			}
			return nil, err
		}
	}
	return s.current, nil
}

// GetCertificate implements tls.Config.GetCertificate.
func (s *ServingCert) GetCertificate(hello *tls.ClientHelloInfo) (*tls.Certificate, error) {
	return s.Certificate(hello.Context())
}

// TLSConfig is the CA port's server configuration. Like istiod's, it asks for
// a client certificate without requiring one: callers authenticate with a
// bearer token or a certificate, and the certificate is verified by the
// renewal authenticator (or by services that require it) against the bundle
// in force, not by the handshake.
func (s *ServingCert) TLSConfig() *tls.Config {
	return &tls.Config{
		MinVersion:     tls.VersionTLS12,
		ClientAuth:     tls.RequestClientCert,
		GetCertificate: s.GetCertificate,
		NextProtos:     []string{"h2"},
	}
}
