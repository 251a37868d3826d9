package server

import (
	"crypto/x509"
	"net/http"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// BundleWatcher yields, read at one instant, the current bundle, the CA
// certificates marked compromised (ca rotate --taint), and a channel closed
// when either changes. *authority.Authority is one.
type BundleWatcher interface {
	Published() (*spiffebundle.Bundle, []*x509.Certificate, <-chan struct{})
}

// DefaultRefreshHint is how often a client that cannot stream should poll.
const DefaultRefreshHint = 5 * time.Minute

// BundleService implements trustmesh.ca.v1.TrustBundleService.
type BundleService struct {
	cav1.UnimplementedTrustBundleServiceServer
	Bundles BundleWatcher
	// Done, when closed, ends every stream, so that a graceful stop of the
	// server does not wait on watchers that never hang up.
	Done <-chan struct{}
}

// WatchBundle sends the current bundle, then every change, until the caller
// goes away.
func (s *BundleService) WatchBundle(_ *cav1.WatchBundleRequest, stream cav1.TrustBundleService_WatchBundleServer) error {
	for {
		b, tainted, changed := s.Bundles.Published()
		msg := ToProto(b)
		for _, c := range tainted {
			msg.TaintedAuthorities = append(msg.TaintedAuthorities, c.Raw)
		}
		if err := stream.Send(msg); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return status.FromContextError(stream.Context().Err()).Err()
		case <-s.Done:
			return status.Error(codes.Unavailable, "the CA is shutting down; reconnect")
		}
	}
}

// ToProto converts a bundle to its wire form.
func ToProto(b *spiffebundle.Bundle) *cav1.TrustBundle {
	out := &cav1.TrustBundle{
		TrustDomain:        b.TrustDomain().Name(),
		RefreshHintSeconds: int64(DefaultRefreshHint / time.Second),
	}
	if seq, ok := b.SequenceNumber(); ok {
		out.SequenceNumber = seq
	}
	for _, c := range b.X509Authorities() {
		out.X509Authorities = append(out.X509Authorities, c.Raw)
	}
	return out
}

// FederationHandler serves the SPIFFE bundle endpoint (JWKS) for federation.
func FederationHandler(td spiffeid.TrustDomain, src spiffebundle.Source) (http.Handler, error) {
	return federation.NewHandler(td, src)
}
