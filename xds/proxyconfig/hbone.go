package proxyconfig

import (
	"fmt"
	"net"
	"net/netip"
	"slices"
	"strings"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	extauthzhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	originaldstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	internalupstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	rawbufferv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/raw_buffer/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	httpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/upstreams/http/v3"
	metadatav3 "github.com/envoyproxy/go-control-plane/envoy/type/metadata/v3"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
	"github.com/trustmesh/trustmesh/mesh"
)

// HBONE between sidecars and ambient pods.
//
// A sidecar reaches a service with an ambient endpoint through HBONE, as
// Istio's sidecars do (its "connect_originate" design), with secure naming
// per destination identity:
//
//   - the service port's cluster (outbound|PORT||HOST) is STATIC and every
//     endpoint is an internal address: the internal listener
//     connect_originate|ID of the endpoint workload's SPIFFE ID, with the
//     endpoint's "IP:port" as endpoint id and in the host metadata that the
//     internal_upstream transport passes to the listener;
//   - that internal listener restores the destination from the metadata
//     (original_dst) and tunnels with tcp_proxy's tunneling_config: an
//     HTTP/2 CONNECT whose :authority is the destination "IP:port";
//   - its cluster connect_originate|ID sends the CONNECT to the original
//     destination's IP on port 15008 over TLS 1.3, ALPN h2, presenting the
//     sidecar's SVID and accepting only a certificate naming ID.
//
// Every endpoint of such a service goes through HBONE, its sidecar
// endpoints too (their inbound accepts HBONE on 15008), so one cluster
// never mixes plaintext-to-internal and TLS-to-pod transports, and the
// cluster carries its endpoints inline: CheckStrictResource sees in the one
// resource that its plaintext transport reaches internal listeners only.
const (
	// ConnectOriginatePrefix starts the names of the internal listeners
	// and tunnel clusters that originate HBONE to one identity.
	ConnectOriginatePrefix = "connect_originate|"
	// ConnectTerminate names the inbound filter chain that accepts HBONE.
	ConnectTerminate = "connect_terminate"
	// HBONEPort is where a pod accepts HBONE: its node proxy's, or its
	// sidecar's.
	HBONEPort = ambientv1.HBONEPort

	// originalDstKey is the metadata namespace original_dst reads an
	// internal connection's destination from ("local": "IP:port").
	originalDstKey         = "envoy.filters.listener.original_dst"
	internalUpstreamSocket = "envoy.transport_sockets.internal_upstream"
	rawBufferSocket        = "envoy.transport_sockets.raw_buffer"
	// tunnelAuthority is the CONNECT :authority: the destination restored
	// by original_dst.
	tunnelAuthority = "%DOWNSTREAM_LOCAL_ADDRESS%"
)

// ConnectOriginate names the internal listener and the tunnel cluster that
// carry HBONE to workloads of identity id.
func ConnectOriginate(id string) string { return ConnectOriginatePrefix + id }

// viaHBONE reports whether a sidecar reaches service s through HBONE: when
// any of its endpoints is captured by a node proxy, which accepts nothing
// else.
func viaHBONE(s *mesh.Service) bool {
	for _, e := range s.Endpoints {
		if e.Workload.Mode() == mesh.DataPlaneAmbient {
			return true
		}
	}
	return false
}

// hboneCluster is the cluster of a service port reached through HBONE:
// its endpoints are the internal listeners of their workloads' identities.
func hboneCluster(name string, s *mesh.Service, p mesh.Port) *clusterv3.Cluster {
	la := &endpointv3.LocalityLbEndpoints{Locality: &corev3.Locality{}, LoadBalancingWeight: wrapperspb.UInt32(1)}
	for _, e := range s.Endpoints {
		dest := net.JoinHostPort(e.Address, fmt.Sprint(e.TargetPort(p)))
		la.LbEndpoints = append(la.LbEndpoints, &endpointv3.LbEndpoint{
			HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{Address: &corev3.Address{
				Address: &corev3.Address_EnvoyInternalAddress{EnvoyInternalAddress: &corev3.EnvoyInternalAddress{
					AddressNameSpecifier: &corev3.EnvoyInternalAddress_ServerListenerName{ServerListenerName: ConnectOriginate(e.Workload.ID.String())},
					EndpointId:           dest,
				}},
			}}},
			Metadata: &corev3.Metadata{FilterMetadata: map[string]*structpb.Struct{
				originalDstKey: {Fields: map[string]*structpb.Value{"local": structpb.NewStringValue(dest)}},
			}},
		})
	}
	return &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		ConnectTimeout:       durationpb.New(10 * time.Second),
		LbPolicy:             clusterv3.Cluster_ROUND_ROBIN,
		LoadAssignment:       &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{la}},
		TransportSocket: &corev3.TransportSocket{Name: internalUpstreamSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&internalupstreamv3.InternalUpstreamTransport{
			PassthroughMetadata: []*internalupstreamv3.InternalUpstreamTransport_MetadataValueSource{{
				Kind: &metadatav3.MetadataKind{Kind: &metadatav3.MetadataKind_Host_{Host: &metadatav3.MetadataKind_Host{}}},
				Name: originalDstKey,
			}},
			TransportSocket: &corev3.TransportSocket{Name: rawBufferSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&rawbufferv3.RawBuffer{})}},
		})}},
	}
}

// hboneOriginate is the internal listener and the tunnel cluster that
// carry HBONE to workloads of identity id.
func (b *Builder) hboneOriginate(id string) (*listenerv3.Listener, *clusterv3.Cluster) {
	name := ConnectOriginate(id)
	l := &listenerv3.Listener{
		Name:              name,
		ListenerSpecifier: &listenerv3.Listener_InternalListener{InternalListener: &listenerv3.Listener_InternalListenerConfig{}},
		ListenerFilters: []*listenerv3.ListenerFilter{
			{Name: "envoy.filters.listener.original_dst", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&originaldstv3.OriginalDst{})}},
		},
		TrafficDirection: corev3.TrafficDirection_OUTBOUND,
		FilterChains: []*listenerv3.FilterChain{{
			Name: name,
			Filters: []*listenerv3.Filter{{Name: "envoy.filters.network.tcp_proxy", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(&tcpproxyv3.TcpProxy{
				StatPrefix:       name,
				ClusterSpecifier: &tcpproxyv3.TcpProxy_Cluster{Cluster: name},
				TunnelingConfig:  &tcpproxyv3.TcpProxy_TunnelingConfig{Hostname: tunnelAuthority},
			})}}},
		}},
	}
	c := &clusterv3.Cluster{
		Name:                 name,
		ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_ORIGINAL_DST},
		LbPolicy:             clusterv3.Cluster_CLUSTER_PROVIDED,
		ConnectTimeout:       durationpb.New(10 * time.Second),
		CleanupInterval:      durationpb.New(60 * time.Second),
		LbConfig: &clusterv3.Cluster_OriginalDstLbConfig_{OriginalDstLbConfig: &clusterv3.Cluster_OriginalDstLbConfig{
			UpstreamPortOverride: wrapperspb.UInt32(HBONEPort),
		}},
		TypedExtensionProtocolOptions: map[string]*anypb.Any{"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": mustAny(&httpv3.HttpProtocolOptions{
			UpstreamProtocolOptions: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_{ExplicitHttpConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig{
				ProtocolConfig: &httpv3.HttpProtocolOptions_ExplicitHttpConfig_Http2ProtocolOptions{Http2ProtocolOptions: &corev3.Http2ProtocolOptions{AllowConnect: true}},
			}},
		})},
		TransportSocket: &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.UpstreamTlsContext{
			CommonTlsContext: b.hboneTLS([]*tlsv3.SubjectAltNameMatcher{uriExact(id)}),
		})}},
	}
	return l, c
}

// hboneTLS is the CommonTlsContext of both ends of HBONE: TLS 1.3 only,
// ALPN h2, the workload certificate and the trust bundle from the agent.
func (b *Builder) hboneTLS(sans []*tlsv3.SubjectAltNameMatcher) *tlsv3.CommonTlsContext {
	c := b.meshCommonTLS(sans, "h2")
	c.TlsParams = &tlsv3.TlsParameters{
		TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_3,
		TlsMaximumProtocolVersion: tlsv3.TlsParameters_TLSv1_3,
	}
	return c
}

// hboneIdentity returns the identity a connect_originate listener or
// cluster name carries.
func hboneIdentity(name string) (string, bool) {
	return strings.CutPrefix(name, ConnectOriginatePrefix)
}

// HBONEDestinationExtension is the ext_authz context extension that the
// CONNECT route of a sidecar's HBONE chain sets to the one local
// destination "IP:port" it tunnels to. authz/engine checks such a CONNECT
// as a TCP connection to that destination, with the tunnel's verified
// client certificate as the source, as the node proxy's checks are; the
// route, not the client, names the destination.
const HBONEDestinationExtension = "trustmesh.io/hbone-destination"

// hboneInbound is the chain of the sidecar's inbound capture listener that
// accepts HBONE on port 15008 (the pod's capture sends it there, as every
// inbound port): TLS 1.3 with the workload's certificate, a client
// certificate of the trust domain required, ALPN h2, and HTTP/2 CONNECT
// terminated into the application port the :authority names. Only the
// workload's own addresses with the ports it serves have a route; anything
// else gets no route (404). Each CONNECT is authorized by ext_authz before
// it is forwarded, as one TCP connection to its destination.
func (b *Builder) hboneInbound(w *mesh.Workload, addrs []string, served []*servedPort) *listenerv3.FilterChain {
	rc := &routev3.RouteConfiguration{Name: ConnectTerminate}
	for _, sp := range served {
		for _, a := range addrs {
			dest := net.JoinHostPort(a, fmt.Sprint(sp.target))
			rc.VirtualHosts = append(rc.VirtualHosts, &routev3.VirtualHost{
				Name:    "connect|" + dest,
				Domains: []string{dest},
				Routes: []*routev3.Route{{
					Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_ConnectMatcher_{ConnectMatcher: &routev3.RouteMatch_ConnectMatcher{}}},
					Action: &routev3.Route_Route{Route: &routev3.RouteAction{
						ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: InboundCluster(sp.target)},
						UpgradeConfigs: []*routev3.RouteAction_UpgradeConfig{{
							UpgradeType:   "CONNECT",
							ConnectConfig: &routev3.RouteAction_UpgradeConfig_ConnectConfig{},
						}},
						Timeout: durationpb.New(0),
					}},
					TypedPerFilterConfig: map[string]*anypb.Any{
						"envoy.filters.http.ext_authz": mustAny(&extauthzhttpv3.ExtAuthzPerRoute{Override: &extauthzhttpv3.ExtAuthzPerRoute_CheckSettings{
							CheckSettings: &extauthzhttpv3.CheckSettings{ContextExtensions: map[string]string{HBONEDestinationExtension: dest}},
						}}),
					},
				}},
			})
		}
	}
	m := &hcmv3.HttpConnectionManager{
		StatPrefix:           ConnectTerminate,
		CodecType:            hcmv3.HttpConnectionManager_HTTP2,
		Http2ProtocolOptions: &corev3.Http2ProtocolOptions{AllowConnect: true},
		UpgradeConfigs:       []*hcmv3.HttpConnectionManager_UpgradeConfig{{UpgradeType: "CONNECT"}},
		HttpFilters:          []*hcmv3.HttpFilter{httpAuthzFilter(), routerFilter()},
		// A tunnel lives as long as its connection.
		StreamIdleTimeout:        durationpb.New(0),
		ForwardClientCertDetails: hcmv3.HttpConnectionManager_SANITIZE,
		UseRemoteAddress:         wrapperspb.Bool(false),
		RouteSpecifier:           &hcmv3.HttpConnectionManager_RouteConfig{RouteConfig: rc},
		Tracing:                  b.httpTracing(canonicalService(w)),
	}
	return &listenerv3.FilterChain{
		Name:             ConnectTerminate,
		FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(HBONEPort)},
		TransportSocket: &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.DownstreamTlsContext{
			CommonTlsContext:         b.hboneTLS([]*tlsv3.SubjectAltNameMatcher{b.trustDomainSAN()}),
			RequireClientCertificate: wrapperspb.Bool(true),
		})}},
		Filters: []*listenerv3.Filter{{Name: "envoy.filters.network.http_connection_manager", ConfigType: &listenerv3.Filter_TypedConfig{TypedConfig: mustAny(m)}}},
	}
}

// workloadAddresses are the addresses a workload is reached at: those the
// mesh gives it, and those of the service endpoints it is; sorted.
func (b *Builder) workloadAddresses(w *mesh.Workload) []string {
	var out []string
	add := func(a string) {
		ip, err := netip.ParseAddr(a)
		if err != nil {
			return
		}
		if s := ip.Unmap().String(); !slices.Contains(out, s) {
			out = append(out, s)
		}
	}
	for _, a := range w.Addresses {
		add(a)
	}
	for _, we := range b.endpointsOf(w.Key()) {
		add(we.endpoint.Address)
	}
	slices.Sort(out)
	return out
}
