package proxyconfig

import (
	"errors"
	"fmt"
	"net/netip"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"google.golang.org/protobuf/proto"

	"github.com/trustmesh/trustmesh/mesh"
)

// ErrPlaintext marks resources that would let plaintext leave the pod, or
// accept a mesh connection without a verified client certificate.
var ErrPlaintext = errors.New("proxyconfig: refusing resources that are not strict mTLS")

// CheckStrict is the last guard before resources are published, whatever
// produced them: every cluster that leaves the pod has TLS that verifies
// the peer's names, and every listener that binds a port serves TLS, with
// a verified client certificate unless it is a gateway's external listener
// (whose certificate is a gateway secret).
func CheckStrict(r *Resources) error {
	var errs []error
	for _, c := range r.Clusters {
		errs = append(errs, CheckStrictResource(c))
	}
	for _, l := range r.Listeners {
		errs = append(errs, CheckStrictResource(l))
	}
	return errors.Join(errs...)
}

// CheckStrictResource checks one cluster or listener as CheckStrict does;
// other resources pass.
func CheckStrictResource(m proto.Message) error {
	switch x := m.(type) {
	case *clusterv3.Cluster:
		if err := strictCluster(x); err != nil {
			return fmt.Errorf("%w: cluster %s: %w", ErrPlaintext, x.GetName(), err)
		}
	case *listenerv3.Listener:
		if err := strictListener(x); err != nil {
			return fmt.Errorf("%w: listener %s: %w", ErrPlaintext, x.GetName(), err)
		}
	}
	return nil
}

func loopbackOnly(c *clusterv3.Cluster) bool {
	if c.GetType() != clusterv3.Cluster_STATIC {
		return false
	}
	for _, le := range c.GetLoadAssignment().GetEndpoints() {
		for _, e := range le.GetLbEndpoints() {
			a, err := netip.ParseAddr(e.GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
			if err != nil || !a.IsLoopback() {
				return false
			}
		}
	}
	return true
}

func strictCluster(c *clusterv3.Cluster) error {
	if loopbackOnly(c) && c.GetTransportSocket() == nil {
		return nil // inside the pod, or nowhere at all
	}
	up := &tlsv3.UpstreamTlsContext{}
	ts := c.GetTransportSocket()
	if ts == nil || ts.GetTypedConfig() == nil || ts.GetTypedConfig().UnmarshalTo(up) != nil {
		return errors.New("no TLS transport socket")
	}
	if len(c.GetTransportSocketMatches()) > 0 {
		return errors.New("transport socket matches could select plaintext")
	}
	common := up.GetCommonTlsContext()
	var vc *tlsv3.CertificateValidationContext
	rootsKnown := false
	switch v := common.GetValidationContextType().(type) {
	case *tlsv3.CommonTlsContext_CombinedValidationContext:
		vc = v.CombinedValidationContext.GetDefaultValidationContext()
		rootsKnown = v.CombinedValidationContext.GetValidationContextSdsSecretConfig() != nil ||
			v.CombinedValidationContext.GetValidationContextCertificateProviderInstance() != nil
	case *tlsv3.CommonTlsContext_ValidationContext:
		vc = v.ValidationContext
	}
	if vc == nil {
		return errors.New("the upstream certificate is not verified")
	}
	if vc.GetTrustedCa() != nil || vc.GetCaCertificateProviderInstance() != nil {
		rootsKnown = true
	}
	if !rootsKnown {
		return errors.New("no trust anchors for the upstream certificate")
	}
	if len(vc.GetMatchTypedSubjectAltNames()) == 0 && len(vc.GetMatchSubjectAltNames()) == 0 {
		return errors.New("no SAN matcher for the upstream certificate")
	}
	return nil
}

func strictListener(l *listenerv3.Listener) error {
	if l.GetApiListener() != nil {
		return nil // a proxyless client's listener binds nothing
	}
	if bp := l.GetBindToPort(); bp != nil && !bp.GetValue() {
		return nil // reached only through the capture listeners, from the pod
	}
	if l.GetDefaultFilterChain() != nil {
		return errors.New("a default filter chain would accept what no chain matches")
	}
	if l.GetName() == VirtualOutbound {
		for _, fc := range l.GetFilterChains() {
			if len(fc.GetFilters()) != 1 || !blackHole(fc.GetFilters()[0]) {
				return errors.New("the capture listener for outbound traffic may only send to the black hole")
			}
		}
		return nil
	}
	if len(l.GetFilterChains()) == 0 {
		return errors.New("no filter chain")
	}
	for _, fc := range l.GetFilterChains() {
		if err := strictDownstream(fc.GetTransportSocket()); err != nil {
			return fmt.Errorf("filter chain %s: %w", fc.GetName(), err)
		}
	}
	return nil
}

func blackHole(f *listenerv3.Filter) bool {
	tp := &tcpproxyv3.TcpProxy{}
	return f.GetTypedConfig() != nil && f.GetTypedConfig().UnmarshalTo(tp) == nil && tp.GetCluster() == BlackHoleCluster
}

func strictDownstream(ts *corev3.TransportSocket) error {
	down := &tlsv3.DownstreamTlsContext{}
	if ts == nil || ts.GetTypedConfig() == nil || ts.GetTypedConfig().UnmarshalTo(down) != nil {
		return errors.New("plaintext")
	}
	common := down.GetCommonTlsContext()
	external := len(common.GetTlsCertificateSdsSecretConfigs()) > 0
	for _, s := range common.GetTlsCertificateSdsSecretConfigs() {
		external = external && strings.HasPrefix(s.GetName(), GatewaySecretPrefix)
	}
	if external {
		return nil // a gateway's external TLS listener
	}
	if !down.GetRequireClientCertificate().GetValue() {
		return errors.New("client certificates are not required")
	}
	switch v := common.GetValidationContextType().(type) {
	case *tlsv3.CommonTlsContext_CombinedValidationContext:
		if v.CombinedValidationContext.GetValidationContextSdsSecretConfig().GetName() != SecretRootCA {
			return errors.New("client certificates are not validated against the trust bundle")
		}
		if len(v.CombinedValidationContext.GetDefaultValidationContext().GetMatchTypedSubjectAltNames()) == 0 {
			return errors.New("client certificates are not limited to the trust domain")
		}
	case *tlsv3.CommonTlsContext_ValidationContext:
		// Proxyless servers: the bundle from the file_watcher provider; the
		// trust-domain check is an RBAC rule (grpc-go refuses SAN matchers).
		if v.ValidationContext.GetCaCertificateProviderInstance().GetCertificateName() != SecretRootCA {
			return errors.New("client certificates are not validated against the trust bundle")
		}
	default:
		return errors.New("client certificates are not validated")
	}
	return nil
}

// ErrSecret marks a gateway secret in resources meant for a node whose
// service account may not read it.
var ErrSecret = errors.New("proxyconfig: refusing a secret to a node that may not read it")

// CheckSecrets is the last guard on secrets, whatever produced the
// resources: every secret in r is a gateway secret of the node's own
// namespace that the mesh lets its service account read (it runs a
// workload of the ingress gateway that serves it).
func CheckSecrets(m *mesh.Mesh, n *Node, r *Resources) error {
	var errs []error
	for _, s := range r.Secrets {
		ns, name, ok := strings.Cut(strings.TrimPrefix(s.GetName(), GatewaySecretPrefix), "/")
		if !ok || !strings.HasPrefix(s.GetName(), GatewaySecretPrefix) || ns != n.Namespace || !m.MayReadSecret(ns, n.ServiceAccount, name) {
			errs = append(errs, fmt.Errorf("%w: %s to %s/%s (service account %s)", ErrSecret, s.GetName(), n.Namespace, n.Pod, n.ServiceAccount))
		}
	}
	return errors.Join(errs...)
}
