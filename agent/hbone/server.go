package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"golang.org/x/net/http2"
)

// Server defaults.
const (
	DefaultHandshakeTimeout     = 10 * time.Second
	DefaultMaxConcurrentStreams = 100
	DefaultIdleTimeout          = 5 * time.Minute
)

// ServerConfig is the server side of HBONE.
type ServerConfig struct {
	Cert   func(hello *tls.ClientHelloInfo) (*tls.Certificate, error) // the destination's SVID
	Bundle x509bundle.Source
	// Accept decides a tunnel: peer is the verified client SPIFFE ID; an error refuses it (403 to the client).
	Accept func(ctx context.Context, peer spiffeid.ID, authority string, remote net.Addr) error
	Handle func(ctx context.Context, t *Tunnel) // owns t; must Close it

	// HandshakeTimeout bounds the TLS handshake of a new connection
	// (default DefaultHandshakeTimeout).
	HandshakeTimeout time.Duration
	// MaxConcurrentStreams bounds the tunnels open at once on one
	// connection (default DefaultMaxConcurrentStreams).
	MaxConcurrentStreams uint32
	// IdleTimeout closes a connection that has carried no tunnel for this
	// long (default DefaultIdleTimeout).
	IdleTimeout time.Duration
	// HandshakeFailed, when set, is told of every connection refused before
	// a tunnel could be asked for (TLS, client certificate, version, ALPN);
	// its error wraps ErrHandshake.
	HandshakeFailed func(remote net.Addr, err error)
}

func (cfg *ServerConfig) validate() error {
	var errs []error
	if cfg.Cert == nil {
		errs = append(errs, errors.New("hbone: ServerConfig.Cert is nil"))
	}
	if cfg.Bundle == nil {
		errs = append(errs, errors.New("hbone: ServerConfig.Bundle is nil"))
	}
	if cfg.Accept == nil {
		errs = append(errs, errors.New("hbone: ServerConfig.Accept is nil"))
	}
	if cfg.Handle == nil {
		errs = append(errs, errors.New("hbone: ServerConfig.Handle is nil"))
	}
	if cfg.HandshakeTimeout < 0 || cfg.IdleTimeout < 0 {
		errs = append(errs, errors.New("hbone: negative timeout"))
	}
	if cfg.HandshakeTimeout == 0 {
		cfg.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if cfg.MaxConcurrentStreams == 0 {
		cfg.MaxConcurrentStreams = DefaultMaxConcurrentStreams
	}
	if cfg.IdleTimeout == 0 {
		cfg.IdleTimeout = DefaultIdleTimeout
	}
	return errors.Join(errs...)
}

// Tunnel is one accepted HBONE tunnel: the bytes of the client's TCP
// connection, the client's verified SPIFFE ID, the :authority it asked for
// and the address it connected from.
type Tunnel struct {
	net.Conn
	Peer      spiffeid.ID
	Authority string
	Remote    net.Addr
}

// Serve accepts HBONE connections on l until ctx is done, then closes l and
// every connection and returns nil once every Handle has returned. It
// returns an error if cfg is incomplete or l fails.
func Serve(ctx context.Context, l net.Listener, cfg ServerConfig) error {
	if err := cfg.validate(); err != nil {
		l.Close()
		return err
	}
	s := &server{
		cfg: cfg,
		tls: &tls.Config{
			MinVersion:             tls.VersionTLS13,
			MaxVersion:             tls.VersionTLS13,
			NextProtos:             []string{ALPN},
			GetCertificate:         cfg.Cert,
			ClientAuth:             tls.RequireAnyClientCert,
			VerifyPeerCertificate:  tlsconfig.VerifyPeerCertificate(cfg.Bundle, tlsconfig.AuthorizeAny()),
			SessionTicketsDisabled: true, // every connection verifies its client
		},
		h2: &http2.Server{
			MaxConcurrentStreams: cfg.MaxConcurrentStreams,
			IdleTimeout:          cfg.IdleTimeout,
		},
		base: &http.Server{
			MaxHeaderBytes: maxHeaderListSize,
			ErrorLog:       log.New(io.Discard, "", 0),
		},
		conns: map[net.Conn]struct{}{},
	}
	s.cond = sync.NewCond(&s.mu)
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	stop := context.AfterFunc(ctx, func() { l.Close() })
	defer stop()

	var err error
	for {
		c, aerr := l.Accept()
		if aerr != nil {
			if ctx.Err() == nil {
				err = fmt.Errorf("hbone: accept: %w", aerr)
			}
			break
		}
		if !s.add(c) {
			c.Close()
			break
		}
		go s.serveConn(ctx, c)
	}
	cancel()
	l.Close()
	s.shutdown()
	return err
}

type server struct {
	cfg  ServerConfig
	tls  *tls.Config
	h2   *http2.Server
	base *http.Server

	mu      sync.Mutex
	cond    *sync.Cond
	closing bool
	conns   map[net.Conn]struct{}
	active  int // serveConn goroutines and running handlers
}

// add counts one more goroutine of the server; false once it shuts down.
func (s *server) add(c net.Conn) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closing {
		return false
	}
	if c != nil {
		s.conns[c] = struct{}{}
	}
	s.active++
	return true
}

func (s *server) done(c net.Conn) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if c != nil {
		delete(s.conns, c)
	}
	s.active--
	s.cond.Broadcast()
}

// shutdown closes every connection and waits for every goroutine to end.
func (s *server) shutdown() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.closing = true
	for c := range s.conns {
		c.Close()
	}
	for s.active > 0 {
		s.cond.Wait()
	}
}

func (s *server) serveConn(ctx context.Context, c net.Conn) {
	defer s.done(c)
	defer c.Close()
	tc := tls.Server(c, s.tls)
	hctx, cancel := context.WithTimeout(ctx, s.cfg.HandshakeTimeout)
	err := tc.HandshakeContext(hctx)
	cancel()
	var peer spiffeid.ID
	if err == nil {
		err = checkNegotiated(tc.ConnectionState())
	}
	if err == nil {
		peer, err = peerID(tc.ConnectionState())
	}
	if err != nil {
		if s.cfg.HandshakeFailed != nil && ctx.Err() == nil {
			s.cfg.HandshakeFailed(c.RemoteAddr(), fmt.Errorf("%w: %w", ErrHandshake, err))
		}
		return
	}
	s.h2.ServeConn(tc, &http2.ServeConnOpts{
		Context:    ctx,
		BaseConfig: s.base,
		Handler:    &handler{s: s, peer: peer, local: c.LocalAddr(), remote: c.RemoteAddr()},
	})
}

type handler struct {
	s             *server
	peer          spiffeid.ID
	local, remote net.Addr
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodConnect {
		w.Header().Set("Allow", http.MethodConnect)
		w.WriteHeader(http.StatusMethodNotAllowed)
		return
	}
	// For CONNECT, r.Host is the :authority.
	authority := r.Host
	if checkAuthority(authority) != nil {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	if err := h.s.cfg.Accept(r.Context(), h.peer, authority, h.remote); err != nil {
		w.WriteHeader(http.StatusForbidden)
		return
	}
	if !h.s.add(nil) {
		w.WriteHeader(http.StatusServiceUnavailable)
		return
	}
	defer h.s.done(nil)
	rc := http.NewResponseController(w)
	w.WriteHeader(http.StatusOK)
	if err := rc.Flush(); err != nil {
		return
	}
	sc := &serverConn{w: w, rc: rc, body: r.Body, local: h.local, remote: h.remote}
	// Whatever Handle does, no write is in flight once the handler returns.
	defer sc.Close()
	h.s.cfg.Handle(r.Context(), &Tunnel{Conn: sc, Peer: h.peer, Authority: authority, Remote: h.remote})
}

// serverConn is a tunnel on the server side: reads come from the request
// stream, writes go to the response stream.
type serverConn struct {
	w             http.ResponseWriter
	rc            *http.ResponseController
	body          io.ReadCloser
	local, remote net.Addr

	wmu sync.Mutex // one write at a time, and Close waits for it

	mu      sync.Mutex
	closed  bool
	writing bool
}

func (c *serverConn) Read(p []byte) (int, error) {
	n, err := c.body.Read(p)
	if err != nil && err != io.EOF {
		c.mu.Lock()
		closed := c.closed
		c.mu.Unlock()
		if closed {
			err = net.ErrClosed
		}
	}
	return n, err
}

func (c *serverConn) Write(p []byte) (int, error) {
	c.wmu.Lock()
	defer c.wmu.Unlock()
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return 0, net.ErrClosed
	}
	c.writing = true
	c.mu.Unlock()
	n, err := c.w.Write(p)
	if err == nil {
		err = c.rc.Flush()
	}
	c.mu.Lock()
	c.writing = false
	c.mu.Unlock()
	return n, err
}

// Close ends the tunnel. Data written before reaches the client, then
// io.EOF; a write still blocked (the client reads no more) is aborted and
// the stream reset.
func (c *serverConn) Close() error {
	c.mu.Lock()
	first := !c.closed
	c.closed = true
	writing := c.writing
	c.mu.Unlock()
	if first {
		if writing {
			c.rc.SetWriteDeadline(time.Now().Add(-time.Second))
		}
		c.body.Close()
	}
	// Wait for a write in flight: the handler must not return under it.
	c.wmu.Lock()
	c.wmu.Unlock() //nolint:staticcheck // an empty critical section waits for the writer
	return nil
}

func (c *serverConn) LocalAddr() net.Addr  { return c.local }
func (c *serverConn) RemoteAddr() net.Addr { return c.remote }

// SetDeadline and its halves are the stream's own: a passed deadline resets
// this tunnel's stream, not the connection's other tunnels.
func (c *serverConn) SetDeadline(t time.Time) error {
	if err := c.SetReadDeadline(t); err != nil {
		return err
	}
	return c.SetWriteDeadline(t)
}

func (c *serverConn) SetReadDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return net.ErrClosed
	}
	return c.rc.SetReadDeadline(t)
}

func (c *serverConn) SetWriteDeadline(t time.Time) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return net.ErrClosed
	}
	return c.rc.SetWriteDeadline(t)
}
