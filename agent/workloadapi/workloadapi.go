// Package workloadapi serves the SPIFFE Workload API (X.509 part) from the
// agent's identity, wire-compatible with go-spiffe's workloadapi client and
// SPIRE's agent: the same messages, the same security header check, and a
// streamed update on every rotation and bundle change.
//
// The agent holds one identity, that of the workload it runs beside, so every
// caller gets that SVID. Who may call is decided by the socket's file
// permissions, not by attesting the caller's process.
package workloadapi

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
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

// Config configures a Server.
type Config struct {
	Source Source
	Logger *slog.Logger
}

// Server implements the Workload API.
type Server struct {
	workload.UnimplementedSpiffeWorkloadAPIServer
	src Source
	log *slog.Logger
}

var _ workload.SpiffeWorkloadAPIServer = (*Server)(nil)

// New returns a server.
func New(cfg Config) (*Server, error) {
	if cfg.Source == nil {
		return nil, errors.New("workloadapi: Source is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{src: cfg.Source, log: cfg.Logger}, nil
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

// FetchX509SVID streams the SVID with its bundle: at once when there is
// one, and again at every change. While the agent holds no valid SVID the
// stream stays open and silent.
func (s *Server) FetchX509SVID(_ *workload.X509SVIDRequest, stream grpc.ServerStreamingServer[workload.X509SVIDResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	var sent identity.Snapshot
	for {
		snap, changed := s.src.Load()
		if snap.Ready() && (snap.SVID != sent.SVID || snap.Bundle != sent.Bundle) {
			resp, err := x509SVIDResponse(snap.SVID, snap.Bundle)
			if err != nil {
				s.log.Error("cannot encode SVID", "error", err)
				return status.Error(codes.Internal, "cannot encode SVID")
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
			sent = snap
		}
		select {
		case <-ctx.Done():
			return status.FromContextError(ctx.Err()).Err()
		case <-changed:
		}
	}
}

// FetchX509Bundles streams the trust bundle, keyed by trust domain ID.
func (s *Server) FetchX509Bundles(_ *workload.X509BundlesRequest, stream grpc.ServerStreamingServer[workload.X509BundlesResponse]) error {
	ctx := stream.Context()
	if err := checkHeader(ctx); err != nil {
		return err
	}
	var sent *x509bundle.Bundle
	for {
		snap, changed := s.src.Load()
		if snap.Bundle != nil && snap.Bundle != sent {
			resp := &workload.X509BundlesResponse{
				Bundles: map[string][]byte{snap.Bundle.TrustDomain().IDString(): concatDER(snap.Bundle)},
			}
			if err := stream.Send(resp); err != nil {
				return err
			}
			sent = snap.Bundle
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

// FetchJWTSVID checks the header, then answers Unimplemented.
func (s *Server) FetchJWTSVID(ctx context.Context, _ *workload.JWTSVIDRequest) (*workload.JWTSVIDResponse, error) {
	if err := checkHeader(ctx); err != nil {
		return nil, err
	}
	return nil, status.Error(codes.Unimplemented, "JWT-SVIDs are not served by this agent")
}

func x509SVIDResponse(s *x509svid.SVID, b *x509bundle.Bundle) (*workload.X509SVIDResponse, error) {
	certs, key, err := s.MarshalRaw()
	if err != nil {
		return nil, fmt.Errorf("workloadapi: %w", err)
	}
	return &workload.X509SVIDResponse{
		Svids: []*workload.X509SVID{{
			SpiffeId:    s.ID.String(),
			X509Svid:    certs,
			X509SvidKey: key,
			Bundle:      concatDER(b),
		}},
	}, nil
}

func concatDER(b *x509bundle.Bundle) []byte {
	var buf bytes.Buffer
	for _, c := range b.X509Authorities() {
		buf.Write(c.Raw)
	}
	return buf.Bytes()
}
