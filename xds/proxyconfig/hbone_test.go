package proxyconfig_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"slices"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	extauthzhttpv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/ext_authz/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	internalupstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/proto"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// makeAmbient turns about a third of a random mesh's application
// workloads ambient, each on a node and in a network namespace, as the
// mesh files declare them.
func makeAmbient(r *rand.Rand, m *mesh.Mesh) {
	for _, w := range meshtest.Workloads(m) {
		if w.Namespace != "istio-system" && r.IntN(3) == 0 {
			w.DataPlaneMode = mesh.DataPlaneAmbient
			w.Node = fmt.Sprintf("node-%d", r.IntN(2))
			w.Netns = w.Namespace + "-" + w.Name
		}
	}
}

func ambientService(s *mesh.Service) bool {
	return slices.ContainsFunc(s.Endpoints, func(e mesh.Endpoint) bool { return e.Workload.Mode() == mesh.DataPlaneAmbient })
}

// serviceOf finds the service and port a cluster named
// outbound|PORT||HOST is for.
func serviceOf(m *mesh.Mesh, cluster string) (*mesh.Service, mesh.Port, bool) {
	for _, s := range m.Services {
		for _, p := range s.Ports {
			if proxyconfig.OutboundCluster(p.Port, s.Hostname) == cluster {
				return s, p, true
			}
		}
	}
	return nil, mesh.Port{}, false
}

// checkHBONECluster: a cluster with the internal_upstream transport is the
// cluster of a service with an ambient endpoint, and each of its endpoints
// is exactly one of the service's: the origination listener of that
// endpoint's workload identity, tunneling to its address and target port.
func checkHBONECluster(t *testing.T, where string, m *mesh.Mesh, c *clusterv3.Cluster, iu *internalupstreamv3.InternalUpstreamTransport, res *proxyconfig.Resources) {
	t.Helper()
	s, p, ok := serviceOf(m, c.GetName())
	if !ok || !ambientService(s) {
		t.Fatalf("%s: internal_upstream cluster %s is not of a service with an ambient endpoint", where, c.GetName())
	}
	if c.GetType() != clusterv3.Cluster_STATIC || c.GetEdsClusterConfig() != nil {
		t.Fatalf("%s: HBONE cluster %s does not carry its endpoints inline", where, c.GetName())
	}
	for _, e := range res.Endpoints {
		if e.GetClusterName() == c.GetName() {
			t.Fatalf("%s: HBONE cluster %s also has EDS endpoints", where, c.GetName())
		}
	}
	if len(iu.GetPassthroughMetadata()) != 1 || iu.GetPassthroughMetadata()[0].GetName() != "envoy.filters.listener.original_dst" ||
		iu.GetPassthroughMetadata()[0].GetKind().GetHost() == nil {
		t.Fatalf("%s: HBONE cluster %s does not pass its hosts' destinations to the listener", where, c.GetName())
	}
	var got, want []string
	for _, le := range c.GetLoadAssignment().GetEndpoints() {
		for _, e := range le.GetLbEndpoints() {
			in := e.GetEndpoint().GetAddress().GetEnvoyInternalAddress()
			local := e.GetMetadata().GetFilterMetadata()["envoy.filters.listener.original_dst"].GetFields()["local"].GetStringValue()
			if in == nil || local != in.GetEndpointId() {
				t.Fatalf("%s: HBONE cluster %s: endpoint %v", where, c.GetName(), e)
			}
			if _, err := netip.ParseAddrPort(local); err != nil {
				t.Fatalf("%s: HBONE cluster %s: destination %q: %v", where, c.GetName(), local, err)
			}
			if !slices.ContainsFunc(res.Listeners, func(l *listenerv3.Listener) bool { return l.GetName() == in.GetServerListenerName() }) {
				t.Fatalf("%s: HBONE cluster %s: no listener %s", where, c.GetName(), in.GetServerListenerName())
			}
			got = append(got, in.GetServerListenerName()+" "+local)
		}
	}
	for _, e := range s.Endpoints {
		want = append(want, proxyconfig.ConnectOriginate(e.Workload.ID.String())+" "+net.JoinHostPort(e.Address, fmt.Sprint(e.TargetPort(p))))
	}
	slices.Sort(got)
	slices.Sort(want)
	if !slices.Equal(got, want) {
		t.Fatalf("%s: HBONE cluster %s endpoints = %v, want %v", where, c.GetName(), got, want)
	}
}

// checkTunnelCluster: connect_originate|ID sends to port 15008 of the
// original destination over TLS 1.3 with ALPN h2, presenting the workload
// certificate, accepting only ID: secure naming.
func checkTunnelCluster(t *testing.T, where string, c *clusterv3.Cluster, id string) {
	t.Helper()
	if c.GetType() != clusterv3.Cluster_ORIGINAL_DST || c.GetOriginalDstLbConfig().GetUpstreamPortOverride().GetValue() != 15008 {
		t.Fatalf("%s: tunnel cluster %s does not send to port 15008", where, c.GetName())
	}
	up := &tlsv3.UpstreamTlsContext{}
	if c.GetTransportSocket().GetTypedConfig().UnmarshalTo(up) != nil {
		t.Fatalf("%s: tunnel cluster %s is not TLS", where, c.GetName())
	}
	common := up.GetCommonTlsContext()
	if common.GetTlsParams().GetTlsMinimumProtocolVersion() != tlsv3.TlsParameters_TLSv1_3 || !slices.Equal(common.GetAlpnProtocols(), []string{"h2"}) {
		t.Fatalf("%s: tunnel cluster %s is not TLS 1.3 with ALPN h2", where, c.GetName())
	}
	if len(common.GetTlsCertificateSdsSecretConfigs()) != 1 || common.GetTlsCertificateSdsSecretConfigs()[0].GetName() != proxyconfig.SecretDefault ||
		common.GetCombinedValidationContext().GetValidationContextSdsSecretConfig().GetName() != proxyconfig.SecretRootCA {
		t.Fatalf("%s: tunnel cluster %s does not use the workload certificate and the bundle", where, c.GetName())
	}
	sans := common.GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
	if len(sans) != 1 || sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_URI || sans[0].GetMatcher().GetExact() != id {
		t.Fatalf("%s: tunnel cluster %s accepts %v, want exactly %s", where, c.GetName(), sans, id)
	}
}

// checkOriginateListener: an internal listener is an HBONE origination
// listener whose one chain CONNECTs, to the destination the endpoint gave,
// through the tunnel cluster of its own identity.
func checkOriginateListener(t *testing.T, where string, l *listenerv3.Listener, res *proxyconfig.Resources) {
	t.Helper()
	if !strings.HasPrefix(l.GetName(), proxyconfig.ConnectOriginatePrefix) {
		t.Fatalf("%s: internal listener %s is not an HBONE origination listener", where, l.GetName())
	}
	tp := &tcpproxyv3.TcpProxy{}
	if len(l.GetFilterChains()) != 1 || len(l.GetFilterChains()[0].GetFilters()) != 1 ||
		l.GetFilterChains()[0].GetFilters()[0].GetTypedConfig().UnmarshalTo(tp) != nil ||
		tp.GetCluster() != l.GetName() || tp.GetTunnelingConfig().GetHostname() != "%DOWNSTREAM_LOCAL_ADDRESS%" {
		t.Fatalf("%s: listener %s does not tunnel through its own cluster", where, l.GetName())
	}
	if !slices.ContainsFunc(res.Clusters, func(c *clusterv3.Cluster) bool { return c.GetName() == l.GetName() }) {
		t.Fatalf("%s: listener %s has no tunnel cluster", where, l.GetName())
	}
}

// checkConnectTerminate: the chain that accepts HBONE is on port 15008,
// TLS 1.3 with ALPN h2, and its connection manager terminates CONNECT only
// to the workload's own addresses and served ports, each route telling
// ext_authz the destination it forwards to; ext_authz runs before the
// router and fails closed.
func checkConnectTerminate(t *testing.T, where string, m *mesh.Mesh, n *proxyconfig.Node, fc *listenerv3.FilterChain, d *tlsv3.DownstreamTlsContext) {
	t.Helper()
	if fc.GetFilterChainMatch().GetDestinationPort().GetValue() != 15008 {
		t.Fatalf("%s: HBONE chain not on port 15008", where)
	}
	common := d.GetCommonTlsContext()
	if common.GetTlsParams().GetTlsMinimumProtocolVersion() != tlsv3.TlsParameters_TLSv1_3 || !slices.Equal(common.GetAlpnProtocols(), []string{"h2"}) {
		t.Fatalf("%s: HBONE chain is not TLS 1.3 with ALPN h2", where)
	}
	h := &hcmv3.HttpConnectionManager{}
	if len(fc.GetFilters()) != 1 || fc.GetFilters()[0].GetTypedConfig().UnmarshalTo(h) != nil {
		t.Fatalf("%s: HBONE chain is not one connection manager", where)
	}
	if h.GetCodecType() != hcmv3.HttpConnectionManager_HTTP2 || !h.GetHttp2ProtocolOptions().GetAllowConnect() ||
		len(h.GetUpgradeConfigs()) != 1 || h.GetUpgradeConfigs()[0].GetUpgradeType() != "CONNECT" || h.GetUseRemoteAddress().GetValue() {
		t.Fatalf("%s: HBONE connection manager does not terminate HTTP/2 CONNECT", where)
	}
	fs := h.GetHttpFilters()
	az := &extauthzhttpv3.ExtAuthz{}
	if len(fs) != 2 || fs[0].GetTypedConfig().UnmarshalTo(az) != nil || az.GetFailureModeAllow() || fs[1].GetName() != "envoy.filters.http.router" {
		t.Fatalf("%s: HBONE connection manager does not authorize every CONNECT before routing it", where)
	}
	w := m.Workload(n.Namespace, n.Pod)
	addrs := map[string]bool{}
	for _, a := range w.Addresses {
		addrs[a] = true
	}
	targets := map[uint32]bool{}
	for _, s := range m.Services {
		for _, e := range s.Endpoints {
			if e.Workload.Key() == w.Key() {
				addrs[e.Address] = true
				for _, p := range s.Ports {
					targets[e.TargetPort(p)] = true
				}
			}
		}
	}
	delete(targets, 15008) // the HBONE port itself is never an application's
	if got, want := len(h.GetRouteConfig().GetVirtualHosts()), len(addrs)*len(targets); got != want {
		t.Fatalf("%s: HBONE chain has %d destinations, want every address with every served port (%d)", where, got, want)
	}
	for _, vh := range h.GetRouteConfig().GetVirtualHosts() {
		if len(vh.GetDomains()) != 1 || len(vh.GetRoutes()) != 1 {
			t.Fatalf("%s: HBONE virtual host %s: want one destination and one route", where, vh.GetName())
		}
		dest, err := netip.ParseAddrPort(vh.GetDomains()[0])
		if err != nil || !addrs[dest.Addr().String()] || !targets[uint32(dest.Port())] {
			t.Fatalf("%s: HBONE chain accepts %q, which is not one of the workload's addresses and ports", where, vh.GetDomains()[0])
		}
		rt := vh.GetRoutes()[0]
		per := &extauthzhttpv3.ExtAuthzPerRoute{}
		if rt.GetMatch().GetConnectMatcher() == nil || rt.GetRoute().GetCluster() != proxyconfig.InboundCluster(uint32(dest.Port())) ||
			len(rt.GetRoute().GetUpgradeConfigs()) != 1 || rt.GetRoute().GetUpgradeConfigs()[0].GetConnectConfig() == nil ||
			rt.GetTypedPerFilterConfig()["envoy.filters.http.ext_authz"].UnmarshalTo(per) != nil ||
			per.GetCheckSettings().GetContextExtensions()[proxyconfig.HBONEDestinationExtension] != vh.GetDomains()[0] {
			t.Fatalf("%s: HBONE route for %s does not terminate CONNECT into its port with ext_authz told the destination", where, vh.GetDomains()[0])
		}
	}
}

// TestAmbientSidecarRefused: the mesh says the pod is ambient, so an Envoy
// claiming to be its sidecar gets nothing.
func TestAmbientSidecarRefused(t *testing.T) {
	w := &mesh.Workload{Namespace: "ns-a", Name: "pod-0", ServiceAccount: "sa-0", ID: spiffeid.RequireFromSegments(td, "ns", "ns-a", "sa", "sa-0"),
		DataPlaneMode: mesh.DataPlaneAmbient, Node: "node-a", Netns: "pod-0"}
	m := &mesh.Mesh{Workloads: []*mesh.Workload{w}}
	n, err := proxyconfig.ParseNode(meshtest.Node("sidecar", "10.0.0.1", w, false))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := proxyconfig.NewBuilder(testConfig(t), m, nil).Build(n); !errors.Is(err, proxyconfig.ErrAmbientWorkload) {
		t.Fatalf("Build() = %v, want ErrAmbientWorkload", err)
	}
}

// mixed builds the sidecar resources of a mesh with an ambient service, a
// mixed one and the sidecar's own, to mutate.
func mixed(t *testing.T) *proxyconfig.Resources {
	t.Helper()
	id := func(sa string) spiffeid.ID { return spiffeid.RequireFromSegments(td, "ns", "ns-a", "sa", sa) }
	self := &mesh.Workload{Namespace: "ns-a", Name: "client-0", ServiceAccount: "client", ID: id("client"), Addresses: []string{"10.0.0.1"}}
	web := &mesh.Workload{Namespace: "ns-a", Name: "web-0", ServiceAccount: "web", ID: id("web"), Addresses: []string{"10.0.0.2"},
		DataPlaneMode: mesh.DataPlaneAmbient, Node: "node-a", Netns: "web-0"}
	m := &mesh.Mesh{Services: []*mesh.Service{{
		Namespace: "ns-a", Name: "web", Hostname: "web.ns-a.svc.cluster.local",
		Ports:     []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP, TargetPort: 8080}},
		Endpoints: []mesh.Endpoint{{Address: "10.0.0.2", Workload: web}},
	}, {
		Namespace: "ns-a", Name: "client", Hostname: "client.ns-a.svc.cluster.local",
		Ports:     []mesh.Port{{Name: "tcp", Port: 7000, Protocol: mesh.TCP}},
		Endpoints: []mesh.Endpoint{{Address: "10.0.0.1", Workload: self}},
	}}}
	if err := m.Validate(td); err != nil {
		t.Fatal(err)
	}
	n, err := proxyconfig.ParseNode(meshtest.Node("sidecar", "10.0.0.1", self, false))
	if err != nil {
		t.Fatal(err)
	}
	res, err := proxyconfig.NewBuilder(testConfig(t), m, nil).Build(n)
	if err != nil {
		t.Fatal(err)
	}
	out := &proxyconfig.Resources{}
	for _, l := range res.Listeners {
		out.Listeners = append(out.Listeners, proto.Clone(l).(*listenerv3.Listener))
	}
	for _, c := range res.Clusters {
		out.Clusters = append(out.Clusters, proto.Clone(c).(*clusterv3.Cluster))
	}
	return out
}

// TestCheckStrictRefusesHBONE shows the guard refusing each way HBONE
// could send plaintext out of the pod, tunnel to another identity, or
// accept a weaker handshake.
func TestCheckStrictRefusesHBONE(t *testing.T) {
	const web = "spiffe://cluster.local/ns/ns-a/sa/web"
	hbone := func(r *proxyconfig.Resources) *clusterv3.Cluster {
		return find(r.Clusters, "outbound|80||web.ns-a.svc.cluster.local")
	}
	tunnel := func(r *proxyconfig.Resources, mutate func(*tlsv3.UpstreamTlsContext)) {
		c := find(r.Clusters, proxyconfig.ConnectOriginate(web))
		up := &tlsv3.UpstreamTlsContext{}
		_ = c.GetTransportSocket().GetTypedConfig().UnmarshalTo(up)
		mutate(up)
		setAny(c.GetTransportSocket().GetTypedConfig(), up)
	}
	terminate := func(r *proxyconfig.Resources, mutate func(*tlsv3.DownstreamTlsContext)) {
		for _, fc := range find(r.Listeners, proxyconfig.VirtualInbound).FilterChains {
			if fc.GetName() == proxyconfig.ConnectTerminate {
				d := &tlsv3.DownstreamTlsContext{}
				_ = fc.GetTransportSocket().GetTypedConfig().UnmarshalTo(d)
				mutate(d)
				setAny(fc.GetTransportSocket().GetTypedConfig(), d)
				return
			}
		}
		panic("no HBONE chain")
	}
	cases := map[string]func(r *proxyconfig.Resources){
		"internal_upstream cluster with an IP endpoint": func(r *proxyconfig.Resources) {
			e := hbone(r).LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint()
			e.Address = find(r.Clusters, proxyconfig.InboundCluster(7000)).LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().GetAddress()
		},
		"internal_upstream cluster over EDS": func(r *proxyconfig.Resources) {
			c := hbone(r)
			c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS}
		},
		"internal endpoint of another listener": func(r *proxyconfig.Resources) {
			hbone(r).LoadAssignment.Endpoints[0].LbEndpoints[0].GetEndpoint().GetAddress().GetEnvoyInternalAddress().AddressNameSpecifier =
				&corev3EnvoyInternalServerName{ServerListenerName: proxyconfig.VirtualInbound}
		},
		"tunnel cluster accepting another identity": func(r *proxyconfig.Resources) {
			tunnel(r, func(up *tlsv3.UpstreamTlsContext) {
				up.CommonTlsContext.GetCombinedValidationContext().DefaultValidationContext.MatchTypedSubjectAltNames[0].GetMatcher().MatchPattern =
					&matcherExact{Exact: "spiffe://cluster.local/ns/ns-a/sa/client"}
			})
		},
		"tunnel cluster with TLS 1.2": func(r *proxyconfig.Resources) {
			tunnel(r, func(up *tlsv3.UpstreamTlsContext) {
				up.CommonTlsContext.TlsParams.TlsMinimumProtocolVersion = tlsv3.TlsParameters_TLSv1_2
			})
		},
		"tunnel cluster without ALPN h2": func(r *proxyconfig.Resources) {
			tunnel(r, func(up *tlsv3.UpstreamTlsContext) { up.CommonTlsContext.AlpnProtocols = []string{"http/1.1"} })
		},
		"tunnel cluster to the application port": func(r *proxyconfig.Resources) {
			find(r.Clusters, proxyconfig.ConnectOriginate(web)).GetOriginalDstLbConfig().UpstreamPortOverride.Value = 8080
		},
		"origination listener through another cluster": func(r *proxyconfig.Resources) {
			f := find(r.Listeners, proxyconfig.ConnectOriginate(web)).FilterChains[0].Filters[0]
			tp := &tcpproxyv3.TcpProxy{}
			_ = f.GetTypedConfig().UnmarshalTo(tp)
			tp.ClusterSpecifier = &tcpproxyv3.TcpProxy_Cluster{Cluster: proxyconfig.InboundCluster(7000)}
			setAny(f.GetTypedConfig(), tp)
		},
		"origination listener without the tunnel": func(r *proxyconfig.Resources) {
			f := find(r.Listeners, proxyconfig.ConnectOriginate(web)).FilterChains[0].Filters[0]
			tp := &tcpproxyv3.TcpProxy{}
			_ = f.GetTypedConfig().UnmarshalTo(tp)
			tp.TunnelingConfig = nil
			setAny(f.GetTypedConfig(), tp)
		},
		"internal listener of another name": func(r *proxyconfig.Resources) {
			find(r.Listeners, proxyconfig.ConnectOriginate(web)).Name = "main_internal"
		},
		"HBONE chain with optional client certificates": func(r *proxyconfig.Resources) {
			terminate(r, func(d *tlsv3.DownstreamTlsContext) { d.RequireClientCertificate = nil })
		},
		"HBONE chain with TLS 1.2": func(r *proxyconfig.Resources) {
			terminate(r, func(d *tlsv3.DownstreamTlsContext) {
				d.CommonTlsContext.TlsParams.TlsMinimumProtocolVersion = tlsv3.TlsParameters_TLSv1_2
			})
		},
	}
	if err := proxyconfig.CheckStrict(mixed(t)); err != nil {
		t.Fatalf("unmodified resources: %v", err)
	}
	for name, mutate := range cases {
		t.Run(name, func(t *testing.T) {
			r := mixed(t)
			mutate(r)
			if err := proxyconfig.CheckStrict(r); !errors.Is(err, proxyconfig.ErrPlaintext) {
				t.Fatalf("CheckStrict() = %v, want ErrPlaintext", err)
			}
		})
	}
}

type (
	corev3EnvoyInternalServerName = corev3.EnvoyInternalAddress_ServerListenerName
	matcherExact                  = matcherv3.StringMatcher_Exact
)

// TestHBONEExtensionIsTheEngines: the route's context extension is the one
// authz/engine reads.
func TestHBONEExtensionIsTheEngines(t *testing.T) {
	if proxyconfig.HBONEDestinationExtension != engine.HBONEDestinationExtension {
		t.Fatalf("proxyconfig sets %q, authz/engine reads %q", proxyconfig.HBONEDestinationExtension, engine.HBONEDestinationExtension)
	}
}
