package proxyconfig

import (
	"errors"
	"fmt"
	"net/netip"
	"slices"
	"strings"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	internalupstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
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
	if iu := internalUpstream(c.GetTransportSocket()); iu != nil {
		return strictInternalCluster(c, iu)
	}
	if id, ok := hboneIdentity(c.GetName()); ok {
		if err := strictTunnelCluster(c, id); err != nil {
			return err
		}
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
	if l.GetInternalListener() != nil {
		return strictOriginateListener(l)
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
		if fc.GetName() == ConnectTerminate {
			if err := strictHBONEDownstream(fc.GetTransportSocket()); err != nil {
				return fmt.Errorf("filter chain %s: %w", fc.GetName(), err)
			}
		}
	}
	return nil
}

// internalUpstream returns the internal_upstream transport socket's
// config, or nil for any other transport.
func internalUpstream(ts *corev3.TransportSocket) *internalupstreamv3.InternalUpstreamTransport {
	iu := &internalupstreamv3.InternalUpstreamTransport{}
	if ts.GetTypedConfig() == nil || ts.GetTypedConfig().UnmarshalTo(iu) != nil {
		return nil
	}
	return iu
}

// strictInternalCluster: a cluster whose transport is internal_upstream
// sends plaintext, so it may reach nothing but the HBONE origination
// listeners of the identities its endpoints claim: it carries its
// endpoints inline (no EDS could add an IP later) and each is an internal
// address of a connect_originate listener, its host metadata naming the
// destination that listener tunnels to. Its inner transport is raw_buffer:
// the TLS is the tunnel cluster's.
func strictInternalCluster(c *clusterv3.Cluster, iu *internalupstreamv3.InternalUpstreamTransport) error {
	if c.GetType() != clusterv3.Cluster_STATIC {
		return errors.New("an internal_upstream cluster must carry its endpoints inline (STATIC)")
	}
	if len(c.GetTransportSocketMatches()) > 0 {
		return errors.New("transport socket matches could select plaintext")
	}
	if inner := iu.GetTransportSocket(); inner != nil {
		rb := &rawbufferv3.RawBuffer{}
		if inner.GetTypedConfig() == nil || inner.GetTypedConfig().UnmarshalTo(rb) != nil {
			return errors.New("the internal_upstream transport wraps something other than raw_buffer")
		}
	}
	n := 0
	for _, le := range c.GetLoadAssignment().GetEndpoints() {
		for _, e := range le.GetLbEndpoints() {
			n++
			in := e.GetEndpoint().GetAddress().GetEnvoyInternalAddress()
			if in == nil {
				return errors.New("an internal_upstream cluster has an endpoint that is not an internal address")
			}
			if _, ok := hboneIdentity(in.GetServerListenerName()); !ok {
				return fmt.Errorf("internal endpoint %q is not an HBONE origination listener", in.GetServerListenerName())
			}
			local := e.GetMetadata().GetFilterMetadata()[originalDstKey].GetFields()["local"].GetStringValue()
			if _, err := netip.ParseAddrPort(local); err != nil || local != in.GetEndpointId() {
				return fmt.Errorf("internal endpoint %s: its destination %q is not its endpoint id %q as IP:port", in.GetServerListenerName(), local, in.GetEndpointId())
			}
		}
	}
	if n == 0 {
		return errors.New("an internal_upstream cluster without endpoints")
	}
	return nil
}

// strictTunnelCluster: the cluster of connect_originate|ID sends to the
// original destination's port 15008 over TLS 1.3 with ALPN h2 and accepts
// only a certificate naming exactly ID (secure naming).
func strictTunnelCluster(c *clusterv3.Cluster, id string) error {
	if c.GetType() != clusterv3.Cluster_ORIGINAL_DST || c.GetOriginalDstLbConfig().GetUpstreamPortOverride().GetValue() != HBONEPort {
		return fmt.Errorf("an HBONE tunnel cluster must send to the original destination's port %d", HBONEPort)
	}
	if len(c.GetTransportSocketMatches()) > 0 {
		return errors.New("transport socket matches could select plaintext")
	}
	up := &tlsv3.UpstreamTlsContext{}
	if c.GetTransportSocket().GetTypedConfig() == nil || c.GetTransportSocket().GetTypedConfig().UnmarshalTo(up) != nil {
		return errors.New("no TLS transport socket")
	}
	common := up.GetCommonTlsContext()
	if err := hboneTLSParams(common); err != nil {
		return err
	}
	sans := common.GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
	if len(common.GetCombinedValidationContext().GetDefaultValidationContext().GetMatchSubjectAltNames()) > 0 ||
		len(sans) != 1 || sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_URI || sans[0].GetMatcher().GetExact() != id {
		return fmt.Errorf("an HBONE tunnel cluster must accept exactly %s", id)
	}
	return nil
}

// hboneTLSParams: TLS 1.3 and ALPN h2 only, as HBONE requires.
func hboneTLSParams(common *tlsv3.CommonTlsContext) error {
	if common.GetTlsParams().GetTlsMinimumProtocolVersion() != tlsv3.TlsParameters_TLSv1_3 {
		return errors.New("HBONE requires TLS 1.3")
	}
	if !slices.Equal(common.GetAlpnProtocols(), []string{"h2"}) {
		return errors.New("HBONE requires ALPN h2 only")
	}
	return nil
}

// strictHBONEDownstream: the chain that accepts HBONE speaks TLS 1.3 with
// ALPN h2 only (strictDownstream has checked the client certificate).
func strictHBONEDownstream(ts *corev3.TransportSocket) error {
	down := &tlsv3.DownstreamTlsContext{}
	if ts.GetTypedConfig() == nil || ts.GetTypedConfig().UnmarshalTo(down) != nil {
		return errors.New("plaintext")
	}
	return hboneTLSParams(down.GetCommonTlsContext())
}

// strictOriginateListener: the only internal listeners are HBONE
// origination listeners, each tunneling everything it gets to its own
// identity's tunnel cluster (which strictTunnelCluster checks).
func strictOriginateListener(l *listenerv3.Listener) error {
	if _, ok := hboneIdentity(l.GetName()); !ok {
		return errors.New("an internal listener that is not an HBONE origination listener")
	}
	if l.GetDefaultFilterChain() != nil || len(l.GetFilterChains()) != 1 || len(l.GetFilterChains()[0].GetFilters()) != 1 {
		return errors.New("an HBONE origination listener has exactly one chain with one filter")
	}
	tp := &tcpproxyv3.TcpProxy{}
	f := l.GetFilterChains()[0].GetFilters()[0]
	if f.GetTypedConfig() == nil || f.GetTypedConfig().UnmarshalTo(tp) != nil || tp.GetCluster() != l.GetName() ||
		tp.GetTunnelingConfig().GetHostname() != tunnelAuthority || tp.GetTunnelingConfig().GetUsePost() {
		return fmt.Errorf("an HBONE origination listener must CONNECT to %s through its own tunnel cluster", tunnelAuthority)
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
