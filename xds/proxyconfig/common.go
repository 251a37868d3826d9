package proxyconfig

import (
	"fmt"
	"net/netip"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	mutationrulesv3 "github.com/envoyproxy/go-control-plane/envoy/config/common/mutation_rules/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extauthzhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	routerv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/router/v3"
	extauthznetv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/ext_authz/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	earlyhmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// Well-known names.
const (
	// SecretDefault and SecretRootCA are the agent's SDS resources: the
	// workload certificate with its key, and the trust bundle.
	SecretDefault = "default"
	SecretRootCA  = "ROOTCA"

	// AuthzCluster reaches the ext_authz service over mTLS.
	AuthzCluster = "trustmesh-authz"
	// BlackHoleCluster has no endpoints: traffic to unknown destinations
	// goes nowhere (the outbound policy is registry-only).
	BlackHoleCluster = "BlackHoleCluster"

	// VirtualInbound and VirtualOutbound are the listeners iptables
	// redirects captured traffic to.
	VirtualInbound  = "virtualInbound"
	VirtualOutbound = "virtualOutbound"

	// GatewaySecretPrefix prefixes the names of gateway TLS secrets served
	// over ADS: "kubernetes://NAMESPACE/NAME".
	GatewaySecretPrefix = "kubernetes://"

	// ProxylessInboundPrefix is grpc-go's server_listener_resource_name_template
	// without its "%s", as in Istio.
	ProxylessInboundPrefix = "xds.istio.io/grpc/lds/inbound/"

	// ProxylessCertProvider is the grpc-go certificate provider instance
	// (file_watcher) holding the agent's files.
	ProxylessCertProvider = "default"

	// LabelsKey is the node metadata key whose labels ext_authz reports as
	// the destination workload's.
	LabelsKey = MetaLabels

	tlsSocket = "envoy.transport_sockets.tls"
)

func mustAny(m proto.Message) *anypb.Any {
	a, err := anypb.New(m)
	if err != nil {
		// Only a nil message fails, which is a programming error.
		panic(fmt.Sprintf("proxyconfig: marshal %T: %v", m, err))
	}
	return a
}

func adsSource() *corev3.ConfigSource {
	return &corev3.ConfigSource{
		ResourceApiVersion:    corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}},
	}
}

// agentSDS is the SDS source of the agent's secrets, through the
// bootstrap's cluster for the agent's socket.
func (b *Builder) agentSDS(name string) *tlsv3.SdsSecretConfig {
	return &tlsv3.SdsSecretConfig{Name: name, SdsConfig: &corev3.ConfigSource{
		ResourceApiVersion: corev3.ApiVersion_V3,
		ConfigSourceSpecifier: &corev3.ConfigSource_ApiConfigSource{ApiConfigSource: &corev3.ApiConfigSource{
			ApiType:                   corev3.ApiConfigSource_GRPC,
			TransportApiVersion:       corev3.ApiVersion_V3,
			SetNodeOnFirstMessageOnly: true,
			GrpcServices: []*corev3.GrpcService{{TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{
				EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: b.cfg.SDSCluster},
			}}},
		}},
	}}
}

func uriExact(id string) *tlsv3.SubjectAltNameMatcher {
	return &tlsv3.SubjectAltNameMatcher{SanType: tlsv3.SubjectAltNameMatcher_URI,
		Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: id}}}
}

// meshCommonTLS is the CommonTlsContext of every mesh connection: the
// workload certificate and the trust bundle from the agent, and SAN
// matchers on the peer.
func (b *Builder) meshCommonTLS(sans []*tlsv3.SubjectAltNameMatcher, alpn ...string) *tlsv3.CommonTlsContext {
	return &tlsv3.CommonTlsContext{
		TlsParams:                      &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
		TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{b.agentSDS(SecretDefault)},
		ValidationContextType: &tlsv3.CommonTlsContext_CombinedValidationContext{
			CombinedValidationContext: &tlsv3.CommonTlsContext_CombinedCertificateValidationContext{
				DefaultValidationContext:         &tlsv3.CertificateValidationContext{MatchTypedSubjectAltNames: sans},
				ValidationContextSdsSecretConfig: b.agentSDS(SecretRootCA),
			},
		},
		AlpnProtocols: alpn,
	}
}

// trustDomainSAN accepts any SPIFFE ID in the trust domain.
func (b *Builder) trustDomainSAN() *tlsv3.SubjectAltNameMatcher {
	return &tlsv3.SubjectAltNameMatcher{SanType: tlsv3.SubjectAltNameMatcher_URI,
		Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: b.cfg.TrustDomain.IDString() + "/"}}}
}

// meshServerTLS requires a client certificate, validated against the
// bundle, naming a SPIFFE ID of the trust domain.
func (b *Builder) meshServerTLS(alpn ...string) *corev3.TransportSocket {
	return &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.DownstreamTlsContext{
		CommonTlsContext:         b.meshCommonTLS([]*tlsv3.SubjectAltNameMatcher{b.trustDomainSAN()}, alpn...),
		RequireClientCertificate: wrapperspb.Bool(true),
	})}}
}

// meshClientTLS is mTLS to a mesh upstream whose certificate must name one
// of ids.
func (b *Builder) meshClientTLS(sni string, ids []string) *corev3.TransportSocket {
	sans := make([]*tlsv3.SubjectAltNameMatcher, 0, len(ids))
	for _, id := range ids {
		sans = append(sans, uriExact(id))
	}
	return &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.UpstreamTlsContext{
		CommonTlsContext: b.meshCommonTLS(sans),
		Sni:              sni,
	})}}
}

func http2Options() map[string]*anypb.Any {
	return map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(&httpv3.HttpProtocolOptions{
		UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
			ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{}},
		}},
	})}
}

func socketAddress(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func lbEndpoint(ip string, port uint32) *endpointv3.LbEndpoint {
	return &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: socketAddress(ip, port)}}}
}

// edsCluster is an EDS cluster served over ADS.
func edsCluster(name string) *clusterv3.Cluster {
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
		EdsClusterConfig:     &clusterv3.Cluster_EdsClusterConfig{EdsConfig: adsSource(), ServiceName: name},
		ConnectTimeout:       durationpb.New(10 * time.Second),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
	}
}

// staticCluster reaches fixed addresses, or a DNS name.
func staticCluster(name, host string, port uint32) *clusterv3.Cluster {
	typ := clusterv3.Cluster_STRICT_DNS
	if _, err := netip.ParseAddr(host); err == nil {
		typ = clusterv3.Cluster_STATIC
	}
	c := &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: typ},
		ConnectTimeout:       durationpb.New(10 * time.Second),
		LoadAssignment: &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{{
			LbEndpoints: []*endpointv3.LbEndpoint{lbEndpoint(host, port)},
		}}},
	}
	if typ == clusterv3.Cluster_STRICT_DNS {
		c.DnsLookupFamily = clusterv3.Cluster_V4_PREFERRED
	}
	return c
}

// authzCluster reaches the ext_authz service over mTLS, checking its
// SPIFFE ID.
func (b *Builder) authzCluster() *clusterv3.Cluster {
	c := staticCluster(AuthzCluster, b.cfg.AuthzHost, b.cfg.AuthzPort)
	c.TransportSocket = b.meshClientTLS("", []string{b.cfg.AuthzID.String()})
	c.TypedExtensionProtocolOptions = http2Options()
	return c
}

func authzService() *corev3.GrpcService {
	return &corev3.GrpcService{
		TargetSpecifier: &corev3.GrpcService_EnvoyGrpc_{EnvoyGrpc: &corev3.GrpcService_EnvoyGrpc{ClusterName: AuthzCluster}},
		Timeout:         durationpb.New(2 * time.Second),
	}
}

// httpAuthzFilter calls the authz engine for every request. It fails
// closed, reports the TLS session (for connection.sni) and the node's
// labels as the destination's.
func httpAuthzFilter() *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: "envoy.filters.http.ext_authz", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&extauthzhttpv3.ExtAuthz{
		Services:                   &extauthzhttpv3.ExtAuthz_GrpcService{GrpcService: authzService()},
		TransportApiVersion:        corev3.ApiVersion_V3,
		FailureModeAllow:           false,
		IncludePeerCertificate:     true,
		IncludeTlsSession:          true,
		BootstrapMetadataLabelsKey: LabelsKey,
	})}}
}

// networkAuthzFilter is the same check for TCP connections.
func networkAuthzFilter() *listenerv3.Filter {
	return &listenerv3.Filter{Name: "envoy.filters.network.ext_authz", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&extauthznetv3.ExtAuthz{
		StatPrefix:                 "ext_authz",
		GrpcService:                authzService(),
		TransportApiVersion:        corev3.ApiVersion_V3,
		FailureModeAllow:           false,
		IncludePeerCertificate:     true,
		IncludeTlsSession:          true,
		BootstrapMetadataLabelsKey: LabelsKey,
	})}}
}

func routerFilter() *hcmv3.HttpFilter {
	return &hcmv3.HttpFilter{Name: "envoy.filters.http.router", ConfigType: &hcmv3.HttpFilter_TypedConfig{TypedConfig: mustAny(&routerv3.Router{})}}
}

// ExternalAddressHeader is the header Envoy sets to the client address it
// trusts; ext_authz reads remote.ip from it.
const ExternalAddressHeader = "x-envoy-external-address"

// hcmKind says which listener an HTTP connection manager serves: a
// gateway's, which faces its clients and derives their address itself, or
// a sidecar's, outbound or inbound.
type hcmKind int

const (
	sidecarOutboundHCM hcmKind = iota
	sidecarInboundHCM
	gatewayHCM
)

// hcm is an HTTP connection manager that, before any filter or route sees
// a request:
//   - normalizes the path, as authz/pathnorm documents: normalize, merge
//     slashes, reject escaped slashes;
//   - normalizes the host: any port and a trailing dot are stripped, so
//     that routing and ext_authz see one host (as Istio's gateways do);
//   - on gateways and sidecar outbound, strips client copies of
//     x-envoy-external-address (an early header mutation, which runs
//     before the connection manager sets its own).
//
// A gateway then derives the client's address itself, as Istio's do:
// use_remote_address, xff_num_trusted_hops from the configuration and no
// internal addresses, so that it overwrites x-envoy-external-address on
// every request. A sidecar never trusts X-Forwarded-For. Sidecar inbound
// keeps the header, because a request a gateway forwarded carries the
// client's address in it; ext_authz believes it only when the mTLS peer
// is a gateway identity (authz/engine RemoteIP), so a copy that any other
// peer sends counts for nothing, and a DENY on remoteIpBlocks at a
// workload still sees the client behind the gateway, as in Istio.
//
// With Config.Tracing it has an OpenTelemetry tracer, whose spans name
// service ("" for the outbound side every sidecar shares).
func (b *Builder) hcm(kind hcmKind, statPrefix string, filters []*hcmv3.HttpFilter, rds string, inline *routev3.RouteConfiguration, service string) *listenerv3.Filter {
	m := &hcmv3.HttpConnectionManager{
		StatPrefix:                   statPrefix,
		CodecType:                    hcmv3.HttpConnectionManager_AUTO,
		HttpFilters:                  filters,
		NormalizePath:                wrapperspb.Bool(true),
		MergeSlashes:                 true,
		PathWithEscapedSlashesAction: hcmv3.HttpConnectionManager_REJECT_REQUEST,
		StripPortMode:                &hcmv3.HttpConnectionManager_StripAnyHostPort{StripAnyHostPort: true},
		StripTrailingHostDot:         true,
		// The peer's identity reaches the application only as Envoy saw it.
		ForwardClientCertDetails:    hcmv3.HttpConnectionManager_SANITIZE_SET,
		SetCurrentClientCertDetails: &hcmv3.HttpConnectionManager_SetCurrentClientCertDetails{Uri: true},
		UseRemoteAddress:            wrapperspb.Bool(kind == gatewayHCM),
		Tracing:                     b.httpTracing(service),
	}
	if kind == gatewayHCM {
		m.XffNumTrustedHops = b.cfg.GatewayTrustedHops
	}
	if kind != sidecarInboundHCM {
		m.EarlyHeaderMutationExtensions = []*corev3.TypedExtensionConfig{{
			Name: "envoy.http.early_header_mutation.header_mutation",
			TypedConfig: mustAny(&earlyhmv3.HeaderMutation{Mutations: []*mutationrulesv3.HeaderMutation{{
				Action: &mutationrulesv3.HeaderMutation_Remove{Remove: ExternalAddressHeader},
			}}}),
		}}
	}
	if inline != nil {
		m.RouteSpecifier = &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: inline}
	} else {
		m.RouteSpecifier = &hcmv3.HttpConnectionManager_Rds{Rds: &hcmv3.Rds{ConfigSource: adsSource(), RouteConfigName: rds}}
	}
	return &listenerv3.Filter{Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(m)}}
}

func tcpProxy(statPrefix, cluster string) *listenerv3.Filter {
	return &listenerv3.Filter{Name: "envoy.filters.network.tcp_proxy", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&tcpproxyv3.TcpProxy{
		StatPrefix:       statPrefix,
		ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: cluster},
	})}}
}

func routeTo(cluster string) *routev3.Route {
	return &routev3.Route{
		Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
		Action: &routev3.Route_Route{Route: &routev3.RouteAction{
			ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster},
			Timeout:          durationpb.New(0),
		}},
	}
}

// OutboundCluster names the cluster for a service port, as Istio does.
func OutboundCluster(port uint32, host string) string {
	return fmt.Sprintf("outbound|%d||%s", port, host)
}

// InboundCluster names the in-pod cluster for a target port.
func InboundCluster(port uint32) string { return fmt.Sprintf("inbound|%d||", port) }
