package caclient

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/keepalive"
	"google.golang.org/grpc/metadata"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// NodeConfig configures a NodeClient: the node agent's client of the CA's
// node service (trustmesh.ca.v1.NodeService).
type NodeConfig struct {
	// Address is the CA's host:port.
	Address string
	// ServerName is the name the CA's serving certificate must carry;
	// default the host of Address.
	ServerName string
	// Roots returns the roots the CA's serving certificate must chain to.
	// It is called at every handshake, so a connection made after a bundle
	// change verifies against the new bundle.
	Roots func() []*x509.Certificate
	// Now is the time at which the CA's serving certificate must be valid;
	// default time.Now.
	Now func() time.Time

	// Exactly one of Certificate and Token.
	//
	// Certificate returns the node's SVID to present as the TLS client
	// certificate, or nil while it has none. It is asked at every call;
	// when it returns another certificate than the connection was made
	// with, the client reconnects, so a renewed node SVID takes effect.
	Certificate func() *tls.Certificate
	// Token returns the bearer token (the node agent's projected
	// service-account token); it is asked at every call.
	Token func() (string, error)
}

// NodeClient calls the CA's node service over one kept connection. It is
// safe for concurrent use.
type NodeClient struct {
	cfg NodeConfig

	mu   sync.Mutex
	conn *grpc.ClientConn
	// leaf is the DER of the client certificate conn presents; nil for a
	// bearer-token connection.
	leaf []byte
	// retired are connections with an older certificate, closed a minute
	// after they were replaced, or by Close.
	retired []*grpc.ClientConn
}

// ErrNoNodeCredential: the node has no certificate to present yet.
var ErrNoNodeCredential = errors.New("caclient: the node has no credential yet")

// NewNodeClient checks cfg and returns a client; it connects at the first
// call.
func NewNodeClient(cfg NodeConfig) (*NodeClient, error) {
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
	if (cfg.Certificate == nil) == (cfg.Token == nil) {
		return nil, errors.New("caclient: the node authenticates with exactly one of a certificate and a token")
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	return &NodeClient{cfg: cfg}, nil
}

// FetchEntries asks which identities the node may hold.
func (c *NodeClient) FetchEntries(ctx context.Context) (*cav1.FetchEntriesResponse, error) {
	conn, ctx, err := c.prepare(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := cav1.NewNodeServiceClient(conn).FetchEntries(ctx, &cav1.FetchEntriesRequest{})
	if err != nil {
		return nil, fmt.Errorf("caclient: fetch entries: %w", err)
	}
	return resp, nil
}

// BatchNewX509SVID asks for one certificate per param, at most
// cav1.MaxBatch. It returns one result per param, in order, or an error if
// the call failed as a whole or the CA answered with another count.
func (c *NodeClient) BatchNewX509SVID(ctx context.Context, params []*cav1.NewX509SVIDParams) ([]*cav1.NewX509SVIDResult, error) {
	if len(params) > cav1.MaxBatch {
		return nil, fmt.Errorf("caclient: %d params in one batch, at most %d", len(params), cav1.MaxBatch)
	}
	conn, ctx, err := c.prepare(ctx)
	if err != nil {
		return nil, err
	}
	resp, err := cav1.NewNodeServiceClient(conn).BatchNewX509SVID(ctx, &cav1.BatchNewX509SVIDRequest{Params: params})
	if err != nil {
		return nil, fmt.Errorf("caclient: batch new X.509-SVID: %w", err)
	}
	if n := len(resp.GetResults()); n != len(params) {
		return nil, fmt.Errorf("%w: %d results for %d params", ErrBadResponse, n, len(params))
	}
	return resp.GetResults(), nil
}

// Close closes the connection.
func (c *NodeClient) Close() error {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, old := range c.retired {
		_ = old.Close() // maybe closed already
	}
	c.retired = nil
	if c.conn == nil {
		return nil
	}
	err := c.conn.Close()
	c.conn, c.leaf = nil, nil
	return err
}

// prepare returns the connection to call on, made anew when the node's
// certificate changed, and ctx with the bearer token when there is one.
func (c *NodeClient) prepare(ctx context.Context) (*grpc.ClientConn, context.Context, error) {
	var cert *tls.Certificate
	if c.cfg.Token != nil {
		tok, err := c.cfg.Token()
		if err != nil {
			return nil, nil, fmt.Errorf("caclient: %w", err)
		}
		if tok == "" {
			return nil, nil, errors.New("caclient: empty token")
		}
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+tok)
	} else {
		cert = c.cfg.Certificate()
		if cert == nil || len(cert.Certificate) == 0 {
			return nil, nil, ErrNoNodeCredential
		}
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.conn != nil && (cert == nil || bytes.Equal(c.leaf, cert.Certificate[0])) {
		return c.conn, ctx, nil
	}
	conn, err := c.dial(cert)
	if err != nil {
		return nil, nil, err
	}
	if old := c.conn; old != nil {
		// Calls in flight on the old connection have a minute to finish;
		// new ones present the new certificate.
		c.retired = append(c.retired, old)
		time.AfterFunc(time.Minute, func() { _ = old.Close() })
	}
	c.conn = conn
	if cert != nil {
		c.leaf = cert.Certificate[0]
	}
	return conn, ctx, nil
}

func (c *NodeClient) dial(cert *tls.Certificate) (*grpc.ClientConn, error) {
	tlsCfg := &tls.Config{
		MinVersion: tls.VersionTLS12,
		// The roots change with the bundle, so the chain is verified by
		// VerifyConnection against the roots of the moment, at every
		// handshake, rather than against a pool fixed at dial.
		InsecureSkipVerify: true, //nolint:gosec // verified in VerifyConnection
		VerifyConnection:   c.verifyServer,
	}
	if cert != nil {
		tlsCfg.GetClientCertificate = func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cert, nil
		}
	}
	conn, err := grpc.NewClient(c.cfg.Address,
		grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)),
		grpc.WithKeepaliveParams(keepalive.ClientParameters{Time: 5 * time.Minute, Timeout: 20 * time.Second}),
	)
	if err != nil {
		return nil, fmt.Errorf("caclient: dial %s: %w", c.cfg.Address, err)
	}
	return conn, nil
}

// verifyServer is what crypto/tls would check with RootCAs and ServerName
// set, with the roots asked for now.
func (c *NodeClient) verifyServer(cs tls.ConnectionState) error {
	roots := c.cfg.Roots()
	if len(roots) == 0 {
		return errors.New("caclient: no roots to verify the CA with")
	}
	if len(cs.PeerCertificates) == 0 {
		return errors.New("caclient: the CA presented no certificate")
	}
	pool := x509.NewCertPool()
	for _, r := range roots {
		pool.AddCert(r)
	}
	inter := x509.NewCertPool()
	for _, ic := range cs.PeerCertificates[1:] {
		inter.AddCert(ic)
	}
	_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{
		DNSName:       c.cfg.ServerName,
		Roots:         pool,
		Intermediates: inter,
		CurrentTime:   c.cfg.Now(),
		KeyUsages:     []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
	})
	if err != nil {
		return fmt.Errorf("caclient: the CA's certificate: %w", err)
	}
	return nil
}
