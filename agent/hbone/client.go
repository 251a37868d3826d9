package hbone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"golang.org/x/net/http2"
)

// maxHeaderListSize bounds the header block either end accepts. A CONNECT
// and its 200 need a few dozen bytes.
const maxHeaderListSize = 16 << 10

// DialConfig is one tunnel's client side.
type DialConfig struct {
	Cert      func() (*tls.Certificate, error) // the source workload's SVID
	Bundle    x509bundle.Source                // verifies the peer
	PeerID    spiffeid.ID                      // the destination's identity; anything else is refused
	Authority string                           // "destIP:port" (IPv6 in brackets)
}

func (cfg DialConfig) validate() error {
	var errs []error
	if cfg.Cert == nil {
		errs = append(errs, errors.New("hbone: DialConfig.Cert is nil"))
	}
	if cfg.Bundle == nil {
		errs = append(errs, errors.New("hbone: DialConfig.Bundle is nil"))
	}
	if cfg.PeerID.IsZero() {
		errs = append(errs, errors.New("hbone: DialConfig.PeerID is empty"))
	}
	if err := checkAuthority(cfg.Authority); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

// Dial runs HBONE over conn (already connected to the peer's 15008) and
// returns the tunnel. ctx bounds the handshake and the CONNECT exchange, not
// the tunnel's life: Close ends that. Dial owns conn: it closes it on every
// error, and the tunnel's Close closes it.
//
// Errors: ErrHandshake (wrapping ErrPeerID for a server with the wrong
// identity) before the CONNECT, *StatusError when the server refused it.
//
// The returned connection's CloseWrite ends the client's half (END_STREAM);
// its deadlines are the TLS connection's, which carries only this tunnel:
// a passed deadline fails the tunnel for good.
func Dial(ctx context.Context, conn net.Conn, cfg DialConfig) (net.Conn, error) {
	if err := cfg.validate(); err != nil {
		conn.Close()
		return nil, err
	}
	tc, cc, err := handshake(ctx, conn, cfg, 0)
	if err != nil {
		return nil, err
	}
	t, err := connect(ctx, cc, cfg.Authority)
	if err != nil {
		cc.Close()
		tc.Close()
		return nil, err
	}
	t.tc, t.owned = tc, true
	return t, nil
}

// handshake runs TLS and the HTTP/2 preface over conn; it closes conn on
// error. idle > 0 closes the HTTP/2 connection after that long without a
// stream.
func handshake(ctx context.Context, conn net.Conn, cfg DialConfig, idle time.Duration) (*tls.Conn, *http2.ClientConn, error) {
	want := cfg.PeerID
	tc := tls.Client(conn, &tls.Config{
		MinVersion: tls.VersionTLS13,
		MaxVersion: tls.VersionTLS13,
		NextProtos: []string{ALPN},
		// The peer is verified against the bundle and PeerID below, not
		// against a DNS name; no SNI is sent.
		InsecureSkipVerify: true,
		VerifyPeerCertificate: tlsconfig.VerifyPeerCertificate(cfg.Bundle,
			func(id spiffeid.ID, _ [][]*x509.Certificate) error {
				if id != want {
					return fmt.Errorf("%w: got %s, want %s", ErrPeerID, id, want)
				}
				return nil
			}),
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return cfg.Cert()
		},
	})
	if err := tc.HandshakeContext(ctx); err != nil {
		tc.Close()
		return nil, nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	if err := checkNegotiated(tc.ConnectionState()); err != nil {
		tc.Close()
		return nil, nil, fmt.Errorf("%w: %w", ErrHandshake, err)
	}
	tr := &http2.Transport{
		DisableCompression: true,
		MaxHeaderListSize:  maxHeaderListSize,
		// Pings find a peer that vanished without a FIN.
		ReadIdleTimeout: 30 * time.Second,
		PingTimeout:     15 * time.Second,
		IdleConnTimeout: idle,
	}
	cc, err := tr.NewClientConn(tc)
	if err != nil {
		tc.Close()
		return nil, nil, fmt.Errorf("hbone: http2: %w", err)
	}
	return tc, cc, nil
}

// connect opens one CONNECT stream on cc. On error the stream is gone; cc is
// the caller's.
func connect(ctx context.Context, cc *http2.ClientConn, authority string) (*clientConn, error) {
	// The stream outlives ctx; Close cancels it.
	streamCtx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	pr, pw := io.Pipe()
	req := (&http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Host: authority},
		Host:   authority,
		// An empty User-Agent is omitted: the request carries the
		// pseudo-headers only.
		Header:        http.Header{"User-Agent": {""}},
		Body:          pr,
		ContentLength: -1,
	}).WithContext(streamCtx)

	type result struct {
		resp *http.Response
		err  error
	}
	done := make(chan result, 1)
	go func() {
		resp, err := cc.RoundTrip(req)
		done <- result{resp, err}
	}()
	abort := func() {
		cancel()
		pw.CloseWithError(net.ErrClosed)
	}
	var res result
	select {
	case res = <-done:
	case <-ctx.Done():
		abort()
		if res = <-done; res.err == nil {
			res.resp.Body.Close()
		}
		return nil, fmt.Errorf("hbone: CONNECT %s: %w", authority, ctx.Err())
	}
	if res.err != nil {
		abort()
		return nil, fmt.Errorf("hbone: CONNECT %s: %w", authority, res.err)
	}
	if res.resp.StatusCode != http.StatusOK {
		res.resp.Body.Close()
		abort()
		return nil, fmt.Errorf("hbone: CONNECT %s: %w", authority, &StatusError{Code: res.resp.StatusCode})
	}
	return &clientConn{cc: cc, body: res.resp.Body, pw: pw, cancel: cancel}, nil
}

// clientConn is a tunnel on the client side: reads come from the response
// stream, writes go to the request stream.
type clientConn struct {
	tc     *tls.Conn
	owned  bool // the connection carries only this tunnel (Dial, not a Pool)
	cc     *http2.ClientConn
	body   io.ReadCloser
	pw     *io.PipeWriter
	cancel context.CancelFunc
	once   sync.Once
}

func (c *clientConn) Read(p []byte) (int, error) { return c.body.Read(p) }

func (c *clientConn) Write(p []byte) (int, error) {
	n, err := c.pw.Write(p)
	if errors.Is(err, io.ErrClosedPipe) {
		err = net.ErrClosed
	}
	return n, err
}

// CloseWrite ends the client's half of the tunnel: the server reads io.EOF
// once it has read everything written before.
func (c *clientConn) CloseWrite() error { return c.pw.Close() }

// Close ends the tunnel both ways (a stream the server has not finished is
// reset) and, unless the connection is a Pool's, closes it.
func (c *clientConn) Close() error {
	c.once.Do(func() {
		c.pw.CloseWithError(net.ErrClosed)
		c.body.Close()
		c.cancel()
		if c.owned {
			c.cc.Close()
			c.tc.Close()
		}
	})
	return nil
}

// ErrPooledDeadline: a pooled tunnel shares its connection, whose deadlines
// would cut every tunnel on it.
var ErrPooledDeadline = errors.New("hbone: deadlines are not supported on a pooled tunnel")

func (c *clientConn) LocalAddr() net.Addr  { return c.tc.LocalAddr() }
func (c *clientConn) RemoteAddr() net.Addr { return c.tc.RemoteAddr() }

func (c *clientConn) SetDeadline(t time.Time) error {
	if !c.owned {
		return ErrPooledDeadline
	}
	return c.tc.SetDeadline(t)
}

func (c *clientConn) SetReadDeadline(t time.Time) error {
	if !c.owned {
		return ErrPooledDeadline
	}
	return c.tc.SetReadDeadline(t)
}

func (c *clientConn) SetWriteDeadline(t time.Time) error {
	if !c.owned {
		return ErrPooledDeadline
	}
	return c.tc.SetWriteDeadline(t)
}

// ConnectionState is the TLS state of the tunnel's connection.
func (c *clientConn) ConnectionState() tls.ConnectionState { return c.tc.ConnectionState() }
