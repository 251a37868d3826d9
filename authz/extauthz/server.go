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

// Checker decides checks; *engine.Engine is one.
type Checker interface {
	Check(ctx context.Context, req *authv3.CheckRequest) (*engine.Decision, error)
}

// DecisionLogger records decisions without blocking; *decisionlog.Logger
// is one.
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

// Serve serves on lis, at most Connections.MaxConnections at once, until
// ctx ends, then stops gracefully within StopTimeout. It closes lis.
func (s *Server) Serve(ctx context.Context, lis net.Listener) error {
	creds := s.cfg.Creds
	if creds == nil {
		creds = insecure.NewCredentials()
	}
	lis = s.cfg.Connections.Limit(lis)
	g := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(creds)}, s.cfg.Connections.GRPCOptions()...)...)
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
// place decisions and errors become ext_authz responses.
func (s *Server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	if s.tracer != nil {
		return s.tracedCheck(ctx, req)
	}
	resp, _, _ := s.check(ctx, req)
	return resp, nil
}

// check decides req; it returns the response, the decision it is made of
// and the engine's error, if evaluation failed.
func (s *Server) check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, *engine.Decision, error) {
	start := time.Now()
	d, err := s.cfg.Engine.Check(ctx, req)
	defer func() { s.cfg.Metrics.observe(d.Allowed, err != nil, time.Since(start)) }()
	if d == nil {
		d = &engine.Decision{HTTPStatus: 403, Reason: engine.ReasonEvaluationError}
	}
	if err != nil && s.cfg.FailOpen {
		d.Allowed = true
		d.Reason = engine.ReasonEvaluationError + " (failing open)"
	}
	if s.cfg.Log != nil {
		s.cfg.Log.Log(req, d)
	}
	return Response(d), d, err
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
