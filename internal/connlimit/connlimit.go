// Package connlimit bounds what clients can hold open on a server's port:
// how many connections it serves at once, how long a handshake, a request
// read or a response write may take, and how long a connection may sit
// idle. Every trustmesh listener and server (the CA and xDS gRPC port,
// ext_authz, the monitoring and bundle endpoints, the injector webhook and
// the agent's monitoring port) takes its limits from a Config, so the
// bounds are set in one place and are the same everywhere.
//
// Without them, one client could hold thousands of idle keep-alive
// connections open, each costing memory and a file descriptor that the
// process shares with its other ports.
package connlimit

import (
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"golang.org/x/net/netutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/keepalive"
)

// Defaults of Config.
const (
	DefaultMaxConnections   = 1024
	DefaultHandshakeTimeout = 10 * time.Second
	DefaultReadTimeout      = 30 * time.Second
	DefaultWriteTimeout     = 30 * time.Second
	DefaultIdleTimeout      = 2 * time.Minute
)

// gRPC keepalive: the server pings a connection quiet for keepaliveTime
// and drops it if no answer comes within keepaliveTimeout; a client that
// pings more often than minPingInterval is sent away (as istiod does).
const (
	keepaliveTime    = 30 * time.Second
	keepaliveTimeout = 10 * time.Second
	minPingInterval  = 15 * time.Second
)

// Config bounds one listener and the server on it. The zero value takes
// every default.
type Config struct {
	// MaxConnections is how many connections are served at once; more wait
	// in the kernel's accept queue until one closes. Zero means
	// DefaultMaxConnections.
	MaxConnections int
	// HandshakeTimeout bounds a new connection's setup: the TLS handshake
	// and the request headers (HTTP), or the TLS handshake and the HTTP/2
	// preface (gRPC). Zero means DefaultHandshakeTimeout.
	HandshakeTimeout time.Duration
	// ReadTimeout and WriteTimeout bound reading a whole HTTP request and
	// writing its response. On a gRPC port, ReadTimeout bounds the wait for
	// an RPC's (first) request message (arrivals.go); the streams
	// themselves are long-lived and are bounded by keepalive. Zero means
	// the defaults.
	ReadTimeout, WriteTimeout time.Duration
	// IdleTimeout closes a connection that has no request (HTTP keep-alive)
	// or no RPC (gRPC) in flight for this long. Zero means
	// DefaultIdleTimeout.
	IdleTimeout time.Duration
}

// WithDefaults returns c with zero fields set to their defaults.
func (c Config) WithDefaults() Config {
	if c.MaxConnections == 0 {
		c.MaxConnections = DefaultMaxConnections
	}
	if c.HandshakeTimeout == 0 {
		c.HandshakeTimeout = DefaultHandshakeTimeout
	}
	if c.ReadTimeout == 0 {
		c.ReadTimeout = DefaultReadTimeout
	}
	if c.WriteTimeout == 0 {
		c.WriteTimeout = DefaultWriteTimeout
	}
	if c.IdleTimeout == 0 {
		c.IdleTimeout = DefaultIdleTimeout
	}
	return c
}

// Validate reports every negative field; zero fields take defaults.
func (c Config) Validate() error {
	var errs []error
	if c.MaxConnections < 0 {
		errs = append(errs, fmt.Errorf("connlimit: maximum connections %d is negative", c.MaxConnections))
	}
	for _, d := range []struct {
		name string
		d    time.Duration
	}{{"handshake", c.HandshakeTimeout}, {"read", c.ReadTimeout}, {"write", c.WriteTimeout}, {"idle", c.IdleTimeout}} {
		if d.d < 0 {
			errs = append(errs, fmt.Errorf("connlimit: %s timeout %s is negative", d.name, d.d))
		}
	}
	return errors.Join(errs...)
}

// Listen listens on network and addr and caps the connections served at
// once; see Limit.
func (c Config) Listen(network, addr string) (net.Listener, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	l, err := net.Listen(network, addr)
	if err != nil {
		return nil, fmt.Errorf("connlimit: %w", err)
	}
	return c.Limit(l), nil
}

// Limit caps the connections l hands out at once: Accept waits while
// MaxConnections accepted connections are open.
func (c Config) Limit(l net.Listener) net.Listener {
	return netutil.LimitListener(l, c.WithDefaults().MaxConnections)
}

// HTTPServer returns a server for h with every timeout set. The caller
// adds what else it needs (TLSConfig, ErrorLog) and serves it on a
// listener from Listen or Limit.
func (c Config) HTTPServer(h http.Handler) *http.Server {
	c = c.WithDefaults()
	return &http.Server{
		Handler: h,
		// The header deadline also bounds the TLS handshake.
		ReadHeaderTimeout: c.HandshakeTimeout,
		ReadTimeout:       c.ReadTimeout,
		WriteTimeout:      c.WriteTimeout,
		IdleTimeout:       c.IdleTimeout,
	}
}

// Per-connection buffers of gRPC servers. A mesh keeps one connection
// open per proxy, mostly idle (xDS), so what an idle connection holds is
// what the control plane's memory grows by per proxy. grpc-go (v1.80 on)
// takes a connection's 32 KiB write buffer from a pool only while a write
// is in flight (SharedWriteBuffer, set here so that a change of default
// does not bring it back per connection); but over TLS its read side keeps
// a 32 KiB bufio.Reader per connection for the connection's life (its
// pooled reader needs a raw socket, not a tls.Conn). TLS below already
// buffers a whole record, so the read buffer only batches frame headers:
// 4 KiB saves 28 KiB per connection, which the xDS benchmark's live heap
// shows (27 kB per connection at 500 connections).
const (
	grpcReadBuffer  = 4 << 10
	grpcWriteBuffer = 32 << 10
)

// GRPCOptions are GRPCOptionsFor with the default Requests.
func (c Config) GRPCOptions() []grpc.ServerOption { return c.GRPCOptionsFor(Requests{}) }

// GRPCOptionsFor are the server options that bound connection setup, idle
// connections, client keepalive pings, what an idle connection holds, and
// what requests may make the server hold (r and arrivals.go).
func (c Config) GRPCOptionsFor(r Requests) []grpc.ServerOption {
	c, r = c.WithDefaults(), r.withDefaults()
	opts := []grpc.ServerOption{
		// Encoded content that many streams send (a message's unknown
		// fields) is sent by reference, not copied per stream (codec.go).
		grpc.ForceServerCodecV2(newSharedCodec(false)),
		grpc.SharedWriteBuffer(true),
		// A fixed window: grpc-go's dynamic one (BDP estimation) pings the
		// peer on the first DATA frame after each ping ack, so each small
		// request or acknowledgement costs both sides a PING and its ack
		// (a write and a read each). The window bounds what a stream may
		// send before its handler reads; grpc-go widens it to fit a message
		// the handler is reading (up to MaxMessage), and returns the
		// connection's window as data arrives, read or not: so unread data
		// is bounded per stream, 64 KiB (grpc-go's least) x MaxStreams per
		// connection, and the connection window bounds nothing unread.
		grpc.StaticStreamWindowSize(64 << 10),
		grpc.StaticConnWindowSize(1 << 20),
		grpc.MaxRecvMsgSize(r.MaxMessage),
		grpc.MaxConcurrentStreams(r.MaxStreams),
		// A header block is held whole while it arrives, one per
		// connection: grpc-go's default allows 16 MiB. gRPC metadata here
		// is a few KiB (a service-account token is the largest).
		grpc.MaxHeaderListSize(maxHeaderList),
		grpc.ReadBufferSize(grpcReadBuffer),
		grpc.WriteBufferSize(grpcWriteBuffer),
		grpc.ConnectionTimeout(c.HandshakeTimeout),
		grpc.KeepaliveParams(keepalive.ServerParameters{
			MaxConnectionIdle: c.IdleTimeout,
			Time:              keepaliveTime,
			Timeout:           keepaliveTimeout,
		}),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{
			MinTime:             minPingInterval,
			PermitWithoutStream: true,
		}),
	}
	return append(opts, newArrivals(r, c.ReadTimeout).options()...)
}

// maxHeaderList is the largest header block a gRPC port accepts.
const maxHeaderList = 64 << 10

// caPortRequests are the CA and xDS port's: requests are small (a CSR is
// at most 16 KiB; an xDS request names at most a few thousand resources);
// a mesh keeps one connection per proxy with one or two streams open (an
// agent, a few; a load generator sharing a connection, 16 unary RPCs at
// once), and clients need no credentials to open a stream, so one
// connection may have at most 64 RPCs waiting for their message (16 MiB).
var caPortRequests = Requests{MaxMessage: 256 << 10, MaxStreams: 1024, MaxArriving: 64}

// GRPCTLSOptions are GRPCOptionsFor for the CA and xDS port (its Requests
// included), a port that serves TLS only and whose streams last as long
// as their clients stay connected: a mesh keeps one connection and two
// streams per proxy open. Two things that every connection or stream
// holds for its life go:
//   - the framer's read buffer: crypto/tls already holds a whole decrypted
//     record and hands the framer's small reads out of it, so the buffer
//     only copied it once more (4 KiB per connection);
//   - stack grown while decoding: messages are decoded aside (codec.go),
//     so a stream's receiving goroutine keeps the stack of its wait.
//
// And the write buffer is 16 KiB, TLS's largest record: crypto/tls writes
// each record with a system call of its own, so a larger buffer makes no
// fewer, while each buffer a connection takes from the pool for a push is
// half the size. A push to thousands of streams at once holds hundreds of
// them (grpc-go's writer yields, buffer in hand, to batch), which the xDS
// benchmark saw as 18 MB of buffers allocated per push at 20,000 proxies.
//
// A plaintext port must not use them: without the read buffer, every frame
// header would be a read system call, and each write one of its own.
func (c Config) GRPCTLSOptions() []grpc.ServerOption {
	// Later options win: these replace GRPCOptions' buffers and codec.
	return append(c.GRPCOptionsFor(caPortRequests), grpc.ReadBufferSize(0), grpc.WriteBufferSize(grpcTLSWriteBuffer),
		grpc.ForceServerCodecV2(newSharedCodec(true)))
}

// grpcTLSWriteBuffer is GRPCTLSOptions' write buffer: crypto/tls's
// largest record payload.
const grpcTLSWriteBuffer = 16 << 10
