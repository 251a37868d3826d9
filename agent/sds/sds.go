// Package sds serves the agent's identity to Envoy over the Secret Discovery
// Service (envoy.service.secret.v3), state-of-the-world and delta, with
// go-control-plane's server and linear cache. It serves the two secrets that
// Istio's and SPIRE's Envoy configurations ask for:
//
//   - "default": the certificate chain and private key (TlsCertificate);
//   - "ROOTCA": the trust bundle as a validation context.
//
// Every rotation and bundle change pushes new versions to connected proxies.
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

// Config configures a Server.
type Config struct {
	Source Source
	Logger *slog.Logger
}

// Server serves SDS. Run copies the identity into the cache; Register adds
// the service to a gRPC server.
type Server struct {
	secretv3.UnimplementedSecretDiscoveryServiceServer
	src   Source
	log   *slog.Logger
	cache *cachev3.LinearCache
	sotw  sotwv3.Server
	delta deltav3.Server
}

var _ secretv3.SecretDiscoveryServiceServer = (*Server)(nil)

// New returns a server.
func New(cfg Config) (*Server, error) {
	if cfg.Source == nil {
		return nil, errors.New("sds: Source is required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	c := cachev3.NewLinearCache(resourcev3.SecretType)
	// Streams end when the gRPC server stops, so the stream handlers need no
	// context of their own.
	return &Server{
		src:   cfg.Source,
		log:   cfg.Logger,
		cache: c,
		sotw:  sotwv3.NewServer(context.Background(), c, nil),
		delta: deltav3.NewServer(context.Background(), c, nil),
	}, nil
}

// Register adds the Secret Discovery Service to g.
func (s *Server) Register(g *grpc.Server) { secretv3.RegisterSecretDiscoveryServiceServer(g, s) }

// StreamSecrets serves state-of-the-world SDS.
func (s *Server) StreamSecrets(stream secretv3.SecretDiscoveryService_StreamSecretsServer) error {
	return s.sotw.StreamHandler(stream, resourcev3.SecretType)
}

// DeltaSecrets serves incremental SDS.
func (s *Server) DeltaSecrets(stream secretv3.SecretDiscoveryService_DeltaSecretsServer) error {
	return s.delta.DeltaStreamHandler(stream, resourcev3.SecretType)
}

// FetchSecrets, the REST-style unary call, is not served: Envoy uses the
// streams over gRPC.
func (s *Server) FetchSecrets(context.Context, *discoveryv3.DiscoveryRequest) (*discoveryv3.DiscoveryResponse, error) {
	return nil, status.Error(codes.Unimplemented, "sds: use StreamSecrets or DeltaSecrets")
}

// Run keeps the served secrets equal to the identity until ctx ends, and
// returns ctx.Err(). Until the first SVID arrives, requests wait. When the
// SVID is withdrawn (it expired without renewal), the last one stays in the
// cache: Envoy would only tear down its listeners without it.
func (s *Server) Run(ctx context.Context) error {
	var served identity.Snapshot
	for {
		snap, changed := s.src.Load()
		update := map[string]types.Resource{}
		if snap.SVID != nil && snap.SVID != served.SVID {
			secret, err := certificateSecret(snap.SVID)
			if err != nil {
				return err
			}
			update[CertificateName] = secret
			served.SVID = snap.SVID
		}
		if snap.Bundle != nil && snap.Bundle != served.Bundle {
			update[RootCAName] = rootCASecret(snap.Bundle)
			served.Bundle = snap.Bundle
		}
		if len(update) > 0 {
			if err := s.cache.UpdateResources(update, nil); err != nil {
				return fmt.Errorf("sds: update cache: %w", err)
			}
			s.log.Debug("SDS secrets updated", "count", len(update))
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		}
	}
}

func certificateSecret(s *x509svid.SVID) (*tlsv3.Secret, error) {
	chain, key, err := s.Marshal()
	if err != nil {
		return nil, fmt.Errorf("sds: %w", err)
	}
	return &tlsv3.Secret{
		Name: CertificateName,
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
