// Package sds serves identities to Envoy over the Secret Discovery Service
// (envoy.service.secret.v3), state-of-the-world and delta, with
// go-control-plane's server and linear cache. It serves the two secrets that
// Istio's and SPIRE's Envoy configurations ask for:
//
//   - "default": the certificate chain and private key (TlsCertificate);
//   - "ROOTCA": the trust bundle as a validation context.
//
// Each identity is also served under its SPIFFE ID, as SPIRE's agent names
// its SVIDs, so a caller with several can ask for each.
//
// The per-pod agent serves its one identity to every caller; the node agent
// serves each attested caller its own (the first of them, sorted by ID, as
// "default"). Every rotation and bundle change pushes new versions to the
// connected proxies of that identity.
package sds

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	cachev3 "github.com/envoyproxy/go-control-plane/pkg/cache/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	deltav3 "github.com/envoyproxy/go-control-plane/pkg/server/delta/v3"
	sotwv3 "github.com/envoyproxy/go-control-plane/pkg/server/sotw/v3"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/agent/identity"
)

// The secret names, as Istio names them.
const (
	CertificateName = "default"
	RootCAName      = "ROOTCA"
)

// Source is the agent's identity.
type Source interface {
	Load() (identity.Snapshot, <-chan struct{})
}

// Resolver returns the identities of the caller of ctx (an incoming gRPC
// stream). Its error, a gRPC status error, is the stream's answer.
type Resolver func(ctx context.Context) (identity.Viewer, error)

// Config configures a Server. Exactly one of Source and Resolve is set.
type Config struct {
	// Source is the one identity every caller gets.
	Source Source
	// Resolve tells callers apart: each gets "default" for the first of
	// its identities (sorted by ID).
	Resolve Resolver
	Logger  *slog.Logger
}

// Server serves SDS; Register adds the service to a gRPC server. Each
// stream resolves its caller and is served from a cache of its own, which
// follows the caller's identities until the stream ends.
type Server struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	resolve Resolver
	log     *slog.Logger
}

var _ secretv3.SecretDiscoveryServiceServer = (*Server)(nil)

// New returns a server.
func New(cfg Config) (*Server, error) {
	if cfg.Source != nil && cfg.Resolve != nil {
		return nil, errors.New("sds: set Source or Resolve, not both")
	}
	resolve := cfg.Resolve
	if cfg.Source != nil {
		v := identity.Fixed(cfg.Source)
		resolve = func(context.Context) (identity.Viewer, error) { return v, nil }
	}
	if resolve == nil {
		return nil, errors.New("sds: Source or Resolve is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	return &Server{resolve: resolve, log: cfg.Logger}, nil
}

// Register adds the Secret Discovery Service to g.
func (s *Server) Register(g *grpc.Server) { secretv3.RegisterSecretDiscoveryServiceServer(g, s) }

// StreamSecrets serves state-of-the-world SDS.
func (s *Server) StreamSecrets(stream secretv3.SecretDiscoveryService_StreamSecretsServer) error {
	return s.serve(stream.Context(), func(ctx context.Context, c *cachev3.LinearCache) error {
		return sotwv3.NewServer(ctx, c, nil).StreamHandler(stream, resourcev3.SecretType)
	})
}

// DeltaSecrets serves incremental SDS.
func (s *Server) DeltaSecrets(stream secretv3.SecretDiscoveryService_DeltaSecretsServer) error {
	return s.serve(stream.Context(), func(ctx context.Context, c *cachev3.LinearCache) error {
		return deltav3.NewServer(ctx, c, nil).DeltaStreamHandler(stream, resourcev3.SecretType)
	})
}

// FetchSecrets, the REST-style unary call, is not served: Envoy uses the
// streams over gRPC.
func (s *Server) FetchSecrets(context.Context, *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	return nil, status.Error(codes.Unimplemented, "sds: use StreamSecrets or DeltaSecrets")
}

// serve resolves the stream's caller, fills a cache with its secrets, and
// runs handle on it while a goroutine keeps the cache equal to the caller's
// identities. When the caller's view fails (its process is gone, it lost
// its identities), handle's context ends and the stream ends with that
// error.
func (s *Server) serve(ctx context.Context, handle func(context.Context, *cachev3.LinearCache) error) error {
	v, err := s.resolve(ctx)
	if err != nil {
		return err
	}
	view, changed, err := v.View(ctx)
	if err != nil {
		return err
	}
	c := cachev3.NewLinearCache(resourcev3.SecretType)
	var served identity.View
	if err := s.update(c, &served, view); err != nil {
		return err
	}
	ctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	followed := make(chan struct{})
	go func() {
		defer close(followed)
		cancel(s.follow(ctx, v, c, served, changed))
	}()
	err = handle(ctx, c)
	cancel(nil)
	<-followed
	if cause := context.Cause(ctx); cause != nil && !errors.Is(cause, context.Canceled) {
		return cause
	}
	return err
}

// follow keeps c equal to v's view until ctx ends or the view fails.
func (s *Server) follow(ctx context.Context, v identity.Viewer, c *cachev3.LinearCache, served identity.View, changed <-chan struct{}) error {
	for {
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
		var (
			view identity.View
			err  error
		)
		view, changed, err = v.View(ctx)
		if err != nil {
			return err
		}
		if err := s.update(c, &served, view); err != nil {
			return err
		}
	}
}

// update puts what changed from served to view into c. Until the first SVID
// arrives, requests wait. When the SVIDs are withdrawn (they expired without
// renewal), the last ones stay in the cache: Envoy would only tear down its
// listeners without them. An identity the caller no longer has, while it
// has others, is removed.
func (s *Server) update(c *cachev3.LinearCache, served *identity.View, view identity.View) error {
	update := map[string]types.Resource{}
	var remove []string
	if len(view.SVIDs) > 0 {
		put := func(name string, svid *x509svid.SVID) error {
			secret, err := certificateSecret(name, svid)
			if err != nil {
				s.log.Error("cannot encode SVID", "error", err)
				return status.Error(codes.Internal, "cannot encode SVID")
			}
			update[name] = secret
			return nil
		}
		if len(served.SVIDs) == 0 || view.SVIDs[0] != served.SVIDs[0] {
			if err := put(CertificateName, view.SVIDs[0]); err != nil {
				return err
			}
		}
		old := map[string]*x509svid.SVID{}
		for _, svid := range served.SVIDs {
			old[svid.ID.String()] = svid
		}
		for _, svid := range view.SVIDs {
			name := svid.ID.String()
			if old[name] != svid {
				if err := put(name, svid); err != nil {
					return err
				}
			}
			delete(old, name)
		}
		for name := range old {
			remove = append(remove, name)
		}
		served.SVIDs = view.SVIDs
	}
	if view.Bundle != nil && view.Bundle != served.Bundle {
		update[RootCAName] = rootCASecret(view.Bundle)
		served.Bundle = view.Bundle
	}
	if len(update) == 0 && len(remove) == 0 {
		return nil
	}
	if err := c.UpdateResources(update, remove); err != nil {
		return status.Errorf(codes.Internal, "sds: update cache: %v", err)
	}
	s.log.Debug("SDS secrets updated", "updated", len(update), "removed", len(remove))
	return nil
}

func certificateSecret(name string, s *x509svid.SVID) (*tlsv3.Secret, error) {
	chain, key, err := s.Marshal()
	if err != nil {
		return nil, fmt.Errorf("sds: %w", err)
	}
	return &tlsv3.Secret{
		Name: name,
		Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
			CertificateChain: inline(chain),
			PrivateKey:       inline(key),
		}},
	}, nil
}

func rootCASecret(b *x509bundle.Bundle) *tlsv3.Secret {
	var roots bytes.Buffer
	for _, c := range b.X509Authorities() {
		_ = pem.Encode(&roots, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
	}
	return &tlsv3.Secret{
		Name: RootCAName,
		Type: &tlsv3.Secret_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
			TrustedCa: inline(roots.Bytes()),
		}},
	}
}

func inline(b []byte) *core.DataSource {
	return &core.DataSource{Specifier: &core.DataSource_InlineBytes{InlineBytes: b}}
}
