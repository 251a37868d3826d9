package proxyconfig

import (
	"fmt"
	"slices"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trustmesh/trustmesh/mesh"
)

// GatewaySecretName names a gateway's TLS secret on the ADS stream.
func GatewaySecretName(ns, name string) string { return GatewaySecretPrefix + ns + "/" + name }

// buildGateway configures a router node: the ingress and egress gateways
// that select its workload (in its own namespace, by the labels the mesh
// gives the pod).
func (b *Builder) buildGateway(n *Node, w *mesh.Workload) *Resources {
	r := &Resources{}
	b.meshClusters(r)
	r.Clusters = append(r.Clusters, b.authzCluster())
	b.addTracing(r)
	selected := false
	for _, g := range b.mesh.Gateways {
		if !g.Selects(w.Namespace, w.Labels) {
			continue
		}
		selected = true
		switch g.Kind {
		case mesh.Ingress:
			b.ingress(r, g, n, w)
		case mesh.Egress:
			b.egress(r, g, w)
		}
	}
	if !selected {
		r.Warnings = append(r.Warnings, "no gateway selects this router: it gets no listener")
	}
	return r
}

// ingress adds external TLS listeners whose certificates are served over
// ADS, from Secrets in the gateway's own namespace only, routing into the
// mesh over mTLS.
func (b *Builder) ingress(r *Resources, g *mesh.Gateway, n *Node, w *mesh.Workload) {
	byPort := map[uint32]*listenerv3.Listener{}
	var order []uint32
	sniSeen := map[uint32]map[string]bool{}
	for i, sv := range g.Servers {
		sec := b.mesh.Secret(g.Namespace, sv.CredentialName)
		if sec == nil {
			r.Warnings = append(r.Warnings, fmt.Sprintf("gateway %s: server %d: no TLS secret %s/%s; server left out", g.Key(), i, g.Namespace, sv.CredentialName))
			continue
		}
		if !b.mesh.MayReadSecret(g.Namespace, n.ServiceAccount, sv.CredentialName) {
			r.Warnings = append(r.Warnings, fmt.Sprintf("gateway %s: server %d: service account %s may not read secret %s/%s; server left out",
				g.Key(), i, n.ServiceAccount, g.Namespace, sv.CredentialName))
			continue
		}
		var hosts []string
		for _, h := range sv.Hosts {
			if sniSeen[sv.Port] == nil {
				sniSeen[sv.Port] = map[string]bool{}
			}
			if !sniSeen[sv.Port][h] {
				sniSeen[sv.Port][h] = true
				hosts = append(hosts, h)
			}
		}
		if len(hosts) == 0 {
			r.Warnings = append(r.Warnings, fmt.Sprintf("gateway %s: server %d: every host is already served on port %d; server left out", g.Key(), i, sv.Port))
			continue
		}
		secretName := GatewaySecretName(g.Namespace, sv.CredentialName)
		if !slices.ContainsFunc(r.Secrets, func(s *tlsv3.Secret) bool { return s.GetName() == secretName }) {
			r.Secrets = append(r.Secrets, &tlsv3.Secret{Name: secretName, Type: &tlsv3.Secret_TlsCertificate{TlsCertificate: &tlsv3.TlsCertificate{
				CertificateChain: &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: sec.CertPEM}},
				PrivateKey:       &corev3.DataSource{Specifier: &corev3.DataSource_InlineBytes{InlineBytes: sec.KeyPEM}},
			}}})
		}
		rc := &routev3.RouteConfiguration{Name: fmt.Sprintf("https.%d.%s.%s.%d", sv.Port, g.Namespace, g.Name, i), ValidateClusters: wrapperspb.Bool(false)}
		byHost := map[string][]*routev3.Route{}
		var hostOrder []string
		for _, rt := range sv.Routes {
			s := b.mesh.Service(rt.Service)
			if s == nil || len(s.Endpoints) == 0 {
				r.Warnings = append(r.Warnings, fmt.Sprintf("gateway %s: route for %s to %s has no endpoints; left out", g.Key(), rt.Host, rt.Service))
				continue
			}
			prefix := rt.PathPrefix
			if prefix == "" {
				prefix = "/"
			}
			route := routeTo(OutboundCluster(rt.Port, s.Hostname))
			route.Match = &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: prefix}}
			if _, ok := byHost[rt.Host]; !ok {
				hostOrder = append(hostOrder, rt.Host)
			}
			byHost[rt.Host] = append(byHost[rt.Host], route)
		}
		seen := map[string]bool{}
		for _, h := range hostOrder {
			addVirtualHost(rc, seen, h, []string{h, fmt.Sprintf("%s:%d", h, sv.Port)}, byHost[h]...)
		}
		r.Routes = append(r.Routes, rc)
		l := byPort[sv.Port]
		if l == nil {
			l = &listenerv3.Listener{
				Name:             fmt.Sprintf("0.0.0.0_%d", sv.Port),
				Address:          socketAddress("0.0.0.0", sv.Port),
				TrafficDirection: corev3.TrafficDirection_INBOUND,
				ListenerFilters: []*listenerv3.ListenerFilter{{Name: "envoy.filters.listener.tls_inspector",
					ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspectorv3.TlsInspector{})}}},
			}
			byPort[sv.Port] = l
			order = append(order, sv.Port)
		}
		l.FilterChains = append(l.FilterChains, &listenerv3.FilterChain{
			Name:             rc.Name,
			FilterChainMatch: &listenerv3.FilterChainMatch{ServerNames: hosts},
			TransportSocket: &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.DownstreamTlsContext{
				CommonTlsContext: &tlsv3.CommonTlsContext{
					TlsParams:                      &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
					TlsCertificateSdsSecretConfigs: []*tlsv3.SdsSecretConfig{{Name: secretName, SdsConfig: adsSource()}},
					AlpnProtocols:                  []string{"h2", "http/1.1"},
				},
			})}},
			Filters: []*listenerv3.Filter{b.hcm(gatewayHCM, rc.Name, []*hcmv3.HttpFilter{httpAuthzFilter(), routerFilter()}, rc.Name, nil, canonicalService(w))},
		})
	}
	for _, p := range order {
		r.Listeners = append(r.Listeners, byPort[p])
	}
}

// egress accepts only mesh mTLS and originates TLS to declared external
// hosts, verifying their names against the system roots or their CA.
func (b *Builder) egress(r *Resources, g *mesh.Gateway, w *mesh.Workload) {
	s := b.mesh.Service(g.Namespace + "/" + g.Service)
	if s == nil {
		r.Warnings = append(r.Warnings, fmt.Sprintf("gateway %s: no service %s", g.Key(), g.Service))
		return
	}
	var port mesh.Port
	for _, p := range s.Ports {
		if p.Port == g.Port {
			port = p
		}
	}
	target := port.Target()
	for _, e := range s.Endpoints {
		if e.Workload.Key() == w.Key() {
			target = e.TargetPort(port)
		}
	}
	name := fmt.Sprintf("egress.%d", target)
	rc := &routev3.RouteConfiguration{Name: name, ValidateClusters: wrapperspb.Bool(false)}
	seen := map[string]bool{}
	for _, x := range b.mesh.External {
		for i, p := range x.Ports {
			cluster := OutboundCluster(p.Target(), x.Host)
			doms := []string{fmt.Sprintf("%s:%d", x.Host, p.Port)}
			if i == 0 {
				doms = append(doms, x.Host)
			}
			addVirtualHost(rc, seen, fmt.Sprintf("%s:%d", x.Host, p.Port), doms, routeTo(cluster))
			if slices.ContainsFunc(r.Clusters, func(c *clusterv3.Cluster) bool { return c.GetName() == cluster }) {
				continue
			}
			c := staticCluster(cluster, x.Host, p.Target())
			c.ClusterDiscoveryType = &clusterv3.Cluster_Type{Type: clusterv3.Cluster_LOGICAL_DNS}
			c.DnsLookupFamily = clusterv3.Cluster_V4_PREFERRED
			ca := x.CAFile
			if ca == "" {
				ca = b.cfg.SystemRoots
			}
			c.TransportSocket = &corev3.TransportSocket{Name: tlsSocket, ConfigType: &corev3.TransportSocket_TypedConfig{TypedConfig: mustAny(&tlsv3.UpstreamTlsContext{
				Sni: x.Host,
				CommonTlsContext: &tlsv3.CommonTlsContext{
					TlsParams: &tlsv3.TlsParameters{TlsMinimumProtocolVersion: tlsv3.TlsParameters_TLSv1_2},
					ValidationContextType: &tlsv3.CommonTlsContext_ValidationContext{ValidationContext: &tlsv3.CertificateValidationContext{
						TrustedCa: &corev3.DataSource{Specifier: &corev3.DataSource_Filename{Filename: ca}},
						MatchTypedSubjectAltNames: []*tlsv3.SubjectAltNameMatcher{{SanType: tlsv3.SubjectAltNameMatcher_DNS,
							Matcher: &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: x.Host}}}},
					}},
				},
			})}}
			c.ConnectTimeout = durationpb.New(10 * time.Second)
			r.Clusters = append(r.Clusters, c)
		}
	}
	r.Routes = append(r.Routes, rc)
	r.Listeners = append(r.Listeners, &listenerv3.Listener{
		Name:             fmt.Sprintf("0.0.0.0_%d", target),
		Address:          socketAddress("0.0.0.0", target),
		TrafficDirection: corev3.TrafficDirection_INBOUND,
		FilterChains: []*listenerv3.FilterChain{{
			Name:            name,
			TransportSocket: b.meshServerTLS("h2", "http/1.1"),
			Filters:         []*listenerv3.Filter{b.hcm(gatewayHCM, name, []*hcmv3.HttpFilter{httpAuthzFilter(), routerFilter()}, name, nil, canonicalService(w))},
		}},
	})
}
