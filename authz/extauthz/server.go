// Package extauthz serves envoy.service.auth.v3.Authorization/Check over
// gRPC. The transport is mTLS with credentials the caller supplies (a
// trustmesh certificate from the CA); plaintext is refused except on a unix
// socket or when InsecurePlaintext says so explicitly.
package extauthz

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	typev3 "github.com/envoyproxy/go-control-plane/envoy/type/v3"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// DefaultAddress is where ext_authz is served.
const DefaultAddress = ":9191"

// Checker decides checks; *engine.Engine is one. CheckInto overwrites
// every field of *d and keeps nothing of d once it returns, so that the
// server can reuse Decisions from call to call.
type Checker interface {
	CheckInto(ctx context.Context, req *authv3.CheckRequest, d *engine.Decision) error
}

// DecisionLogger records decisions without blocking; *decisionlog.Logger
// is one. Log must copy what it keeps of d: the server reuses d once Log
// returns.
type DecisionLogger interface {
	Log(req *authv3.CheckRequest, d *engine.Decision)
}

var _ Checker = (*engine.Engine)(nil)

// ErrPlaintext refuses a plaintext TCP listener that was not asked for.
var ErrPlaintext = errors.New("extauthz: plaintext is only allowed on a unix socket or with InsecurePlaintext")

// Config configures a Server.
type Config struct {
	Engine Checker
	// Log may be nil.
	Log DecisionLogger
	// Address is "host:port" or "unix:///path/to.sock"; empty means
	// DefaultAddress.
	Address string
	// Creds are the server's transport credentials (mTLS).
	Creds credentials.TransportCredentials
	// InsecurePlaintext allows a TCP listener without Creds, for local
	// testing only.
	InsecurePlaintext bool
	// FailOpen allows requests whose evaluation failed. The default, false,
	// denies them with 403; failing open must be asked for.
	FailOpen bool
	// StopTimeout bounds graceful shutdown; zero means 5s.
	StopTimeout time.Duration
	// Metrics, when set, counts decisions and times them.
	Metrics *Metrics
	// Connections bounds the connections served at once, connection
	// setup, idle connections and client pings; zero values take
	// connlimit's defaults.
	Connections connlimit.Config
	// TracerProvider, when set, traces each Check (an ext_authz.Check
	// span, child of the caller's W3C trace context). Nil turns tracing
	// off: Check then starts no span and allocates nothing for it.
	TracerProvider trace.TracerProvider
}

// Validate checks cfg, collecting every error.
func (c *Config) Validate() error {
	var errs []error
	if c.Engine == nil {
		errs = append(errs, errors.New("extauthz: an engine is required"))
	}
	if c.Creds == nil && !c.InsecurePlaintext && !isUnix(c.address()) {
		errs = append(errs, ErrPlaintext)
	}
	if err := c.Connections.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("extauthz: %w", err))
	}
	return errors.Join(errs...)
}

func (c *Config) address() string {
	if c.Address == "" {
		return DefaultAddress
	}
	return c.Address
}

func isUnix(addr string) bool { return strings.HasPrefix(addr, "unix:") }

// Server is the ext_authz gRPC service.
type Server struct {
	authv3.UnimplementedAuthorizationServer
	cfg Config
	// tracer is nil when tracing is off.
	tracer trace.Tracer
	// decisions are reused from call to call (Checker.CheckInto).
	decisions sync.Pool
	// denials holds the denied responses that carry nothing of the call
	// (sharedDenial), built once each.
	denials responseCache
}

var _ authv3.AuthorizationServer = (*Server)(nil)

// New validates cfg and returns a Server.
func New(cfg Config) (*Server, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if cfg.StopTimeout <= 0 {
		cfg.StopTimeout = 5 * time.Second
	}
	s := &Server{cfg: cfg}
	s.decisions.New = func() any { return new(engine.Decision) }
	if cfg.TracerProvider != nil {
		s.tracer = cfg.TracerProvider.Tracer(TracerName)
	}
	return s, nil
}

// Run listens on the configured address and serves until ctx ends. A
// listener that cannot be opened is an error.
func (s *Server) Run(ctx context.Context) error {
	addr := s.cfg.address()
	network := "tcp"
	if isUnix(addr) {
		network = "unix"
		addr = strings.TrimPrefix(strings.TrimPrefix(addr, "unix://"), "unix:")
		if err := os.Remove(addr); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("extauthz: removing stale socket: %w", err)
		}
	}
	lis, err := net.Listen(network, addr)
	if err != nil {
		return fmt.Errorf("extauthz: %w", err)
	}
	return s.Serve(ctx, lis)
}

// streamWorkers is how many goroutines serve calls, each one call after
// another. Without them grpc-go starts a goroutine per call, whose 8 KiB
// stack a Rego evaluation grows by copying, call after call: under load,
// runtime.morestack and copystack took 23% of the server's CPU with the
// sample Rego as a CUSTOM provider (perf). A worker keeps its grown stack
// (grpc-go replaces it every 65,536 calls); calls beyond the workers in
// flight get their own goroutine, as before.
const streamWorkers = 64

// Serve serves on lis, at most Connections.MaxConnections at once, until
// ctx ends, then stops gracefully within StopTimeout. It closes lis.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	creds := s.cfg.Creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	lis = s.cfg.Connections.Limit(lis)
	// A CheckRequest is Envoy's request headers (at most 60 KiB by
	// default) and the peer's certificate, never the body here: 128 KiB.
	// Envoy multiplexes its checks on one connection, so every stream a
	// connection may open may be arriving at once (connlimit.Requests).
	g := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(creds), grpc.NumStreamWorkers(streamWorkers)},
		s.cfg.Connections.GRPCOptionsFor(connlimit.Requests{MaxMessage: 128 << 10, MaxStreams: 1024})...)...)
	authv3.RegisterAuthorizationServer(g, s)
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(lis) }()
	select {
	case err := <-errc:
		if err != nil {
			return fmt.Errorf("extauthz: %w", err)
		}
		return nil
	case <-ctx.Done():
	}
	done := make(chan struct{})
	go func() {
		g.GracefulStop()
		close(done)
	}()
	t := time.NewTimer(s.cfg.StopTimeout)
	defer t.Stop()
	select {
	case <-done:
	case <-t.C:
		g.Stop()
		<-done
	}
	<-errc
	return nil
}

// Check implements envoy.service.auth.v3.Authorization/Check. It is the one
// place decisions and errors become ext_authz responses. The response may
// be shared with other calls (see Response): callers must not modify it.
func (s *Server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	d := s.decisions.Get().(*engine.Decision)
	var resp *authv3.CheckResponse
	if s.tracer != nil {
		resp = s.tracedCheck(ctx, req, d)
	} else {
		resp, _ = s.check(ctx, req, d)
	}
	*d = engine.Decision{} // keep nothing of this call alive in the pool
	s.decisions.Put(d)
	return resp, nil
}

// check decides req into d and returns the response made of it and the
// engine's error, if evaluation failed.
func (s *Server) check(ctx context.Context, req *authv3.CheckRequest, d *engine.Decision) (*authv3.CheckResponse, error) {
	start := time.Now()
	err := s.cfg.Engine.CheckInto(ctx, req, d)
	if err != nil {
		// The engine denies what it could not evaluate (403, with
		// ReasonEvaluationError); fail closed whatever a Checker left.
		d.Allowed = false
		if s.cfg.FailOpen {
			d.Allowed = true
			d.Reason = engine.ReasonEvaluationError + " (failing open)"
		}
	}
	if s.cfg.Log != nil {
		s.cfg.Log.Log(req, d)
	}
	resp := s.response(d)
	s.cfg.Metrics.observe(d.Allowed, err != nil, time.Since(start))
	return resp, err
}

// allowed is the response to every allowed request that adds no header:
// it carries nothing of the call, so one value serves all, marshalled
// concurrently (a proto message that nobody modifies may be).
var allowed = &authv3.CheckResponse{
	Status:       &status.Status{Code: int32(codes.OK)},
	HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{}},
}

// response is Response, with the responses that carry nothing of the call
// shared rather than built per call.
func (s *Server) response(d *engine.Decision) *authv3.CheckResponse {
	if d.Allowed {
		if len(d.Headers) == 0 && len(d.ResponseHeadersToAdd) == 0 {
			return allowed
		}
		return Response(d)
	}
	if len(d.Headers) > 0 || d.Body != "" {
		return Response(d)
	}
	k := denialKey{reason: d.Reason, policy: d.Policy, status: d.HTTPStatus}
	if r := s.denials.get(k); r != nil {
		return r
	}
	r := Response(d)
	s.denials.put(k, r)
	return r
}

// Response turns a decision into a CheckResponse.
func Response(d *engine.Decision) *authv3.CheckResponse {
	if d.Allowed {
		return &authv3.CheckResponse{
			Status: &status.Status{Code: int32(codes.OK)},
			HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{
				Headers:              headerOptions(d.Headers),
				ResponseHeadersToAdd: headerOptions(d.ResponseHeadersToAdd),
			}},
		}
	}
	code := d.HTTPStatus
	if code == 0 {
		code = 403
	}
	msg := d.Reason
	if d.Policy != "" {
		msg += ": " + d.Policy
	}
	return &authv3.CheckResponse{
		Status: &status.Status{Code: int32(codes.PermissionDenied), Message: msg},
		HttpResponse: &authv3.CheckResponse_DeniedResponse{DeniedResponse: &authv3.DeniedHttpResponse{
			Status:  &typev3.HttpStatus{Code: typev3.StatusCode(code)},
			Headers: headerOptions(d.Headers),
			Body:    d.Body,
		}},
	}
}

// denialKey is all a denial without headers or body is made of.
type denialKey struct {
	reason, policy string
	status         int
}

// maxSharedDenials bounds the responseCache. Reasons are the engine's
// constants and policies those of the set in force, so the bound is
// reached only by many policies' worth of denials over many reloads;
// past it, denials are built per call, as before.
const maxSharedDenials = 4096

// responseCache maps denials to their shared response; reads take no
// lock.
type responseCache struct {
	m sync.Map // denialKey -> *authv3.CheckResponse
	n atomic.Int64
}

func (c *responseCache) get(k denialKey) *authv3.CheckResponse {
	if r, ok := c.m.Load(k); ok {
		return r.(*authv3.CheckResponse)
	}
	return nil
}

func (c *responseCache) put(k denialKey, r *authv3.CheckResponse) {
	if c.n.Load() >= maxSharedDenials {
		return
	}
	if _, loaded := c.m.LoadOrStore(k, r); !loaded {
		c.n.Add(1)
	}
}

func headerOptions(hs []engine.Header) []*corev3.HeaderValueOption {
	if len(hs) == 0 {
		return nil
	}
	out := make([]*corev3.HeaderValueOption, len(hs))
	for i, h := range hs {
		out[i] = &corev3.HeaderValueOption{Header: &corev3.HeaderValue{Key: h.Key, Value: h.Value}}
	}
	return out
}
