package node

import (
	"crypto/tls"
	"errors"
	"fmt"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/agent"
	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/node/proxy"
)

// storeBundle is the trust bundle of the moment in a store, as an
// x509bundle.Source.
type storeBundle struct{ st *identity.Store }

func (b storeBundle) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	snap, _ := b.st.Load()
	if snap.Bundle == nil {
		return nil, errors.New("node: no trust bundle yet")
	}
	return snap.Bundle.GetX509BundleForTrustDomain(td)
}

// newProxy wires the L4 proxy: the node authenticates to the xDS server
// and ext_authz with its node SVID, spiffe://TD/node/NAME (off Kubernetes
// its own credential; on Kubernetes the one the CA issues it through its
// delegated batch, kept by ownNodeSVID).
func newProxy(s *settings, cred *agent.Credential, ca NodeCA, holder *Holder, reg prometheus.Registerer) ([]part, error) {
	var parts []part
	own := cred.Store
	if s.token != nil {
		own = identity.New()
		ns := &ownNodeSVID{
			ca: ca, bundle: cred.Store, name: s.NodeName, keyType: s.keyType, ttl: s.CertTTL, clock: s.Clock,
			backoff: backoff.Backoff{Initial: time.Second, Max: time.Minute}, log: s.Logger.With("component", "node-svid"), store: own,
		}
		parts = append(parts, part{"node SVID", ns.Run})
	}
	nodeCert := func() (*tls.Certificate, error) {
		snap, _ := own.Load()
		if snap.SVID == nil || !isNodeID(snap.SVID.ID, s.NodeName) {
			return nil, errors.New("node: no node SVID yet")
		}
		return tlsCertificate(snap.SVID), nil
	}
	authzName := s.AuthzServerName
	if authzName == "" {
		authzName = s.CAServerName
	}
	px, err := proxy.New(proxy.Config{
		NodeName: s.NodeName, NodeIP: s.NodeIP,
		XDSAddress: s.XDSAddress, XDSServerName: s.XDSServerName,
		AuthzAddress: s.AuthzAddress, AuthzServerName: authzName,
		Roots: cred.Roots, NodeCertificate: nodeCert, Bundle: storeBundle{cred.Store},
		Identities: holder, Kubernetes: s.token != nil, ProcRoot: s.Attest.ProcRoot,
		Backoff: backoff.Backoff{Initial: time.Second, Max: 30 * time.Second},
		Logger:  s.Logger.With("component", "proxy"), Registerer: reg,
	})
	if err != nil {
		return nil, fmt.Errorf("node: %w", err)
	}
	return append(parts, part{"proxy", px.Run}), nil
}
