// Package caclient is the agent's client of the trustmesh CA's wire API:
// Istio's IstioCertificateService/CreateCertificate for issuance and renewal,
// and trustmesh.ca.v1.TrustBundleService/WatchBundle for the trust bundle.
//
// Every call dials afresh, so the CA's serving certificate is always verified
// against the agent's current trust bundle and a renewal always presents the
// agent's current certificate. Calls are rare (one issuance per half-life and
// one long-lived bundle stream), so the extra handshakes cost nothing.
package caclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// ErrBadResponse: the CA answered with something that is not a certificate
// chain.
var ErrBadResponse = errors.New("caclient: malformed certificate response")

// Config configures a Client.
type Config struct {
	// Address is the CA's host:port.
	Address string
	// ServerName is the name the CA's serving certificate must carry. It
	// defaults to the host of Address.
	ServerName string
	// Roots returns the roots that the CA's serving certificate must chain
	// to. It is called at every dial, so it should return the current trust
	// bundle.
	Roots func() []*x509.Certificate
	// Now is the time at which the CA's serving certificate must be valid;
	// default time.Now. The agent passes its clock.
	Now func() time.Time
}

// Client talks to the CA. It is safe for concurrent use.
type Client struct {
	cfg Config
}

// New checks cfg and returns a client.
func New(cfg Config) (*Client, error) {
	host, _, err := net.SplitHostPort(cfg.Address)
	if err != nil {
		return nil, fmt.Errorf("caclient: CA address %q: %w", cfg.Address, err)
	}
	if cfg.ServerName == "" {
		cfg.ServerName = host
	}
	if cfg.Roots == nil {
		return nil, errors.New("caclient: no roots to verify the CA with")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &Client{cfg: cfg}, nil
}

// IssueWithToken asks for a certificate for csrPEM, authenticated by a bearer
// token (a Kubernetes service-account token or a join token). ttl zero lets
// the CA choose. The chain is returned leaf first, as the CA sent it.
func (c *Client) IssueWithToken(ctx context.Context, token string, csrPEM []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	if token == "" {
		return nil, errors.New("caclient: empty token")
	}
	ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	return c.create(ctx, nil, csrPEM, ttl)
}

// Renew asks for a certificate for csrPEM, authenticated by presenting cert
// as the TLS client certificate. No bearer token is sent.
func (c *Client) Renew(ctx context.Context, cert tls.Certificate, csrPEM []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	return c.create(ctx, &cert, csrPEM, ttl)
}

func (c *Client) create(ctx context.Context, cert *tls.Certificate, csrPEM []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	conn, err := c.dial(cert)
	if err != nil {
		return nil, err
	}
	defer conn.Close()
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr:              string(csrPEM),
		ValidityDuration: int64(ttl / time.Second),
	})
	if err != nil {
		return nil, fmt.Errorf("caclient: create certificate: %w", err)
	}
	return parseChain(resp.GetCertChain())
}

// WatchBundle follows the CA's bundle stream, calling fn with each bundle,
// until ctx ends, the stream breaks, or fn returns an error. It always
// returns an error; context.Canceled when ctx was canceled.
func (c *Client) WatchBundle(ctx context.Context, fn func(*cav1.TrustBundle) error) error {
	conn, err := c.dial(nil)
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stream, err := cav1.NewTrustBundleServiceClient(conn).WatchBundle(ctx, &cav1.WatchBundleRequest{})
	if err != nil {
		return fmt.Errorf("caclient: watch bundle: %w", err)
	}
	for {
		b, err := stream.Recv()
		if err != nil {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			return fmt.Errorf("caclient: watch bundle: %w", err)
		}
		if err := fn(b); err != nil {
			return err
		}
	}
}

func (c *Client) dial(cert *tls.Certificate) (*grpc.ClientConn, error) {
	roots := c.cfg.Roots()
	if len(roots) == 0 {
		return nil, errors.New("caclient: no roots to verify the CA with")
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	tlsCfg := &tls.Config{
		RootCAs:    pool,
		ServerName: c.cfg.ServerName,
		MinVersion: tls.VersionTLS12,
		Time:       c.cfg.Now,
	}
	if cert != nil {
		// GetClientCertificate presents the certificate even when the
		// server's list of acceptable CAs would not select it.
		tlsCfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert, nil
		}
	}
	conn, err := grpc.NewClient(c.cfg.Address,
		grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)),
		// The server's default enforcement allows one ping per five minutes.
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 5 * time.Minute, Timeout: 20 * time.Second}),
	)
	if err != nil {
		return nil, fmt.Errorf("caclient: dial %s: %w", c.cfg.Address, err)
	}
	return conn, nil
}

// parseChain decodes the PEM strings of an IstioCertificateResponse. Each
// string normally holds one certificate; several blocks in one string are
// accepted too.
func parseChain(pems []string) ([]*x509.Certificate, error) {
	var chain []*x509.Certificate
	for _, s := range pems {
		rest := []byte(s)
		for {
			var block *pem.Block
			block, rest = pem.Decode(rest)
			if block == nil {
				break
			}
			if block.Type != "CERTIFICATE" {
				return nil, fmt.Errorf("%w: unexpected PEM block %q", ErrBadResponse, block.Type)
			}
			cert, err := x509.ParseCertificate(block.Bytes)
			if err != nil {
				return nil, fmt.Errorf("%w: %w", ErrBadResponse, err)
			}
			chain = append(chain, cert)
		}
	}
	if len(chain) == 0 {
		return nil, fmt.Errorf("%w: no certificates", ErrBadResponse)
	}
	return chain, nil
}
