// Package workloadapi serves the SPIFFE Workload API (X.509 part),
// wire-compatible with go-spiffe's workloadapi client and SPIRE's agent: the
// same messages, the same security header check, and a streamed update on
// every rotation and bundle change.
//
// A server serves one of two things:
//   - Source: one fixed identity that every caller gets, as the per-pod agent
//     does; who may call is decided by the socket's file permissions;
//   - Resolve: the identities of the attested caller, as the node agent does;
//     each call resolves its caller first, and gets exactly that caller's
//     SVIDs (several, sorted by ID, the first its default) and the bundle.
package workloadapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/agent/identity"
)

// Source is the agent's identity.
type Source interface {
	Load() (identity.Snapshot, <-chan struct{})
}

// Resolver returns the identities of the caller of ctx (an incoming gRPC
// call). Its error, a gRPC status error, is the call's answer.
type Resolver func(ctx context.Context) (identity.Viewer, error)

// Config configures a Server. Exactly one of Source and Resolve is set.
type Config struct {
	// Source is the one identity every caller gets.
	Source Source
	// Resolve tells callers apart.
	Resolve Resolver
	Logger  *slog.Logger
}

// Server implements the Workload API.
type Server struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	resolve Resolver
	log     *slog.Logger
}

var _ workload.SpiffeWorkloadAPIServer = (*Server)(nil)

// New returns a server.
func New(cfg Config) (*Server, error) {
	resolve, err := resolver(cfg.Source, cfg.Resolve)
	if err != nil {
		return nil, fmt.Errorf("workloadapi: %w", err)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{resolve: resolve, log: cfg.Logger}, nil
}

func resolver(src Source, resolve Resolver) (Resolver, error) {
	switch {
	case src != nil && resolve != nil:
		return nil, errors.New("set Source or Resolve, not both")
	case resolve != nil:
		return resolve, nil
	case src != nil:
		v := identity.Fixed(src)
		return func(context.Context) (identity.Viewer, error) { return v, nil }, nil
	}
	return nil, errors.New("Source or Resolve is required")
}

// Register adds the Workload API to g.
func (s *Server) Register(g *grpc.Server) { workload.RegisterSpiffeWorkloadAPIServer(g, s) }

// errMissingHeader is returned, as SPIRE does, to callers that do not send
// the workload.spiffe.io header. Requiring a header that browsers and SSRF
// proxies cannot be made to send keeps such indirect callers out.
var errMissingHeader = status.Error(codes.InvalidArgument, "security header missing from request")

func checkHeader(ctx context.Context) error {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return errMissingHeader
	}
	v := md.Get("workload.spiffe.io")
	if len(v) != 1 || v[0] != "true" {
		return errMissingHeader
	}
	return nil
}

// FetchX509SVID streams the caller's SVIDs with the bundle: at once when
// there are some, and again at every change. While the caller has no valid
// SVID the stream stays open and silent.
func (s *Server) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	v, err := s.resolve(ctx)
	if err != nil {
		return err
	}
	var sent identity.View
	for {
		view, changed, err := v.View(ctx)
		if err != nil {
			return err
		}
		if view.Ready() && !view.Same(sent) {
			resp, err := x509SVIDResponse(view)
			if err != nil {
				s.log.Error("cannot encode SVID", "error", err)
				return status.Error(codes.Internal, "cannot encode SVID")
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
			sent = view
		}
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-changed:
		}
	}
}

// FetchX509Bundles streams the trust bundle, keyed by trust domain ID, to a
// caller that has an identity.
func (s *Server) FetchX509Bundles(_ *workload.X509BundlesRequest, stream grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	v, err := s.resolve(ctx)
	if err != nil {
		return err
	}
	var sent *x509bundle.Bundle
	for {
		view, changed, err := v.View(ctx)
		if err != nil {
			return err
		}
		if view.Bundle != nil && view.Bundle != sent {
			resp := &workload.X509BundlesResponse{
				Bundles: map[string][]byte{view.Bundle.TrustDomain().IDString(): concatDER(view.Bundle)},
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
			sent = view.Bundle
		}
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-changed:
		}
	}
}

// The JWT methods are not served yet; they answer Unimplemented, which
// go-spiffe's client treats as a permanent answer.

// FetchJWTSVID checks the header and the caller, then answers
// Unimplemented.
func (s *Server) FetchJWTSVID(ctx context.Context, _ *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	if _, err := s.resolve(ctx); err != nil {
		return nil, err
	}
	return nil, status.Error(codes.Unimplemented, "JWT-SVIDs are not served by this agent")
}

func x509SVIDResponse(v identity.View) (*workload.X509SVIDResponse, error) {
	bundle := concatDER(v.Bundle)
	resp := &workload.X509SVIDResponse{Svids: make([]*workload.X509SVID, 0, len(v.SVIDs))}
	for _, s := range v.SVIDs {
		certs, key, err := s.MarshalRaw()
		if err != nil {
			return nil, fmt.Errorf("workloadapi: %s: %w", s.ID, err)
		}
		resp.Svids = append(resp.Svids, &workload.X509SVID{
			SpiffeId:    s.ID.String(),
			X509Svid:    certs,
			X509SvidKey: key,
			Bundle:      bundle,
		})
	}
	return resp, nil
}

func concatDER(b *x509bundle.Bundle) []byte {
	var buf bytes.Buffer
	for _, c := range b.X509Authorities() {
		buf.Write(c.Raw)
	}
	return buf.Bytes()
}
