package proxyconfig_test

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"slices"
	"sort"
	"strings"
	"testing"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	headermutationv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/header_mutation/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/http/rbac/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tcpproxyv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/tcp_proxy/v3"
	earlyhmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/http/early_header_mutation/header_mutation/v3"
	internalupstreamv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/internal_upstream/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

func testConfig(t testing.TB) proxyconfig.Config {
	cfg, err := proxyconfig.Config{
		TrustDomain: td, AuthzHost: "trustmesh.trustmesh-system.svc", AuthzPort: 9191,
		AuthzID: spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh"),
	}.WithDefaults()
	if err != nil {
		t.Fatal(err)
	}
	return cfg
}

// nodesOf returns a sidecar and a proxyless node per workload and a router
// node per gateway workload.
func nodesOf(m *mesh.Mesh) map[string]*proxyconfig.Node {
	out := map[string]*proxyconfig.Node{}
	add := func(typ string, w *mesh.Workload, proxyless bool) {
		n, err := proxyconfig.ParseNode(meshtest.Node(typ, "10.9.9.9", w, proxyless))
		if err != nil {
			panic(err)
		}
		out[fmt.Sprintf("%s/%s/proxyless=%t", typ, w.Key(), proxyless)] = n
	}
	for _, w := range meshtest.Workloads(m) {
		if w.Namespace == "istio-system" {
			add("router", w, false)
			continue
		}
		add("sidecar", w, false)
		add("sidecar", w, true)
	}
	return out
}

// TestRandomMeshes checks, over random meshes, policies and gateways, that
// every generated resource validates and that the mesh is strict mTLS:
// every listener serving a mesh workload requires a client certificate
// validated against the bundle and limited to the trust domain; every
// cluster to a mesh endpoint has TLS with SAN matchers naming exactly the
// service's workloads; nothing plaintext leaves the pod.
func TestRandomMeshes(t *testing.T) {
	cfg := testConfig(t)
	seen := map[string]int{}
	for seed := range uint64(300) {
		r := rand.New(rand.NewPCG(seed, 7))
		m := meshtest.Random(r, td)
		makeAmbient(r, m)
		if err := m.Validate(td); err != nil {
			t.Fatalf("seed %d: random mesh is invalid: %v", seed, err)
		}
		b := proxyconfig.NewBuilder(cfg, m, meshtest.RandomPolicies(r, 4))
		// A pod the mesh does not know gets nothing, whatever it claims.
		for _, typ := range []string{"sidecar", "router"} {
			stranger, err := proxyconfig.ParseNode(meshtest.Node(typ, "10.9.9.9", &mesh.Workload{Namespace: "istio-system", Name: "stranger", ServiceAccount: "ingress",
				Labels: map[string]string{"istio": "ingressgateway"}}, false))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := b.Build(stranger); !errors.Is(err, proxyconfig.ErrUnknownWorkload) {
				t.Fatalf("seed %d: Build(%s stranger) = %v, want ErrUnknownWorkload", seed, typ, err)
			}
		}
		for name, n := range nodesOf(m) {
			res, err := b.Build(n)
			if w := m.Workload(n.Namespace, n.Pod); w.Mode() == mesh.DataPlaneAmbient && !n.Proxyless && n.Type == proxyconfig.Sidecar {
				if !errors.Is(err, proxyconfig.ErrAmbientWorkload) {
					t.Fatalf("seed %d: %s: Build() = %v for an ambient pod's sidecar, want ErrAmbientWorkload", seed, name, err)
				}
				seen["refused ambient sidecar"]++
				continue
			}
			if err != nil {
				t.Fatalf("seed %d: %s: Build() = %v", seed, name, err)
			}
			if err := res.ValidateAll(); err != nil {
				t.Fatalf("seed %d: %s: %v", seed, name, err)
			}
			if err := proxyconfig.CheckStrict(res); err != nil {
				t.Fatalf("seed %d: %s: CheckStrict() = %v", seed, name, err)
			}
			checkInvariants(t, fmt.Sprintf("seed %d: %s", seed, name), m, n, res)
			checkConnectionManagers(t, fmt.Sprintf("seed %d: %s", seed, name), cfg, n, res)
			for _, l := range res.Listeners {
				if l.GetInternalListener() != nil {
					seen["origination listener"]++
				}
				for _, fc := range l.GetFilterChains() {
					if fc.GetName() == proxyconfig.ConnectTerminate {
						seen["HBONE inbound chain"]++
					}
				}
			}
		}
	}
	// The HBONE checks above were not vacuous.
	for _, k := range []string{"origination listener", "HBONE inbound chain", "refused ambient sidecar"} {
		if seen[k] < 10 {
			t.Fatalf("only %d %s over all seeds", seen[k], k)
		}
	}
}

func downstream(t *testing.T, fc *listenerv3.FilterChain) *tlsv3.DownstreamTlsContext {
	t.Helper()
	ts := fc.GetTransportSocket()
	if ts == nil {
		return nil
	}
	d := &tlsv3.DownstreamTlsContext{}
	if err := ts.GetTypedConfig().UnmarshalTo(d); err != nil {
		t.Fatalf("filter chain %s: transport socket is not downstream TLS: %v", fc.GetName(), err)
	}
	return d
}

func checkInvariants(t *testing.T, where string, m *mesh.Mesh, n *proxyconfig.Node, res *proxyconfig.Resources) {
	t.Helper()
	for _, l := range res.Listeners {
		if l.GetApiListener() != nil {
			if !n.Proxyless {
				t.Fatalf("%s: an Envoy got an API listener %s", where, l.GetName())
			}
			continue
		}
		if l.GetInternalListener() != nil {
			checkOriginateListener(t, where, l, res)
			continue
		}
		if l.GetDefaultFilterChain() != nil {
			t.Fatalf("%s: listener %s has a default filter chain", where, l.GetName())
		}
		bound := l.GetBindToPort() == nil || l.GetBindToPort().GetValue()
		switch {
		case !bound:
			// Reached only from the pod through the capture listener.
			if l.GetTrafficDirection().String() != "OUTBOUND" {
				t.Fatalf("%s: unbound listener %s is not outbound", where, l.GetName())
			}
		case l.GetName() == proxyconfig.VirtualOutbound:
			for _, fc := range l.GetFilterChains() {
				tp := &tcpproxyv3.TcpProxy{}
				if len(fc.GetFilters()) != 1 || fc.GetFilters()[0].GetTypedConfig().UnmarshalTo(tp) != nil || tp.GetCluster() != proxyconfig.BlackHoleCluster {
					t.Fatalf("%s: the outbound capture listener sends somewhere other than the black hole", where)
				}
			}
		default:
			external := n.Type == proxyconfig.Router && isIngressListener(m, l)
			for _, fc := range l.GetFilterChains() {
				d := downstream(t, fc)
				if d == nil {
					t.Fatalf("%s: listener %s chain %s is plaintext", where, l.GetName(), fc.GetName())
				}
				if external {
					for _, s := range d.GetCommonTlsContext().GetTlsCertificateSdsSecretConfigs() {
						if !strings.HasPrefix(s.GetName(), "kubernetes://"+n.Namespace+"/") {
							t.Fatalf("%s: gateway uses secret %s outside its namespace", where, s.GetName())
						}
					}
					continue
				}
				checkMeshServer(t, where+": "+l.GetName(), n, d, fc)
				if fc.GetName() == proxyconfig.ConnectTerminate {
					checkConnectTerminate(t, where+": "+l.GetName(), m, n, fc, d)
				}
			}
		}
	}
	for _, c := range res.Clusters {
		checkCluster(t, where, m, n, c, res)
	}
	for _, s := range res.Secrets {
		if !strings.HasPrefix(s.GetName(), "kubernetes://"+n.Namespace+"/") || n.Type != proxyconfig.Router {
			t.Fatalf("%s: secret %s served to a node in %s", where, s.GetName(), n.Namespace)
		}
		if string(s.GetTlsCertificate().GetCertificateChain().GetInlineBytes()) == "OTHER" {
			t.Fatalf("%s: another namespace's secret was served", where)
		}
	}
}

func isIngressListener(m *mesh.Mesh, l *listenerv3.Listener) bool {
	for _, fc := range l.GetFilterChains() {
		if len(fc.GetFilterChainMatch().GetServerNames()) > 0 {
			return true
		}
	}
	return false
}

// checkMeshServer: a client certificate is required, validated against the
// trust bundle, and limited to the trust domain (a SAN matcher for Envoy,
// the first RBAC filter for grpc-go).
func checkMeshServer(t *testing.T, where string, n *proxyconfig.Node, d *tlsv3.DownstreamTlsContext, fc *listenerv3.FilterChain) {
	t.Helper()
	if !d.GetRequireClientCertificate().GetValue() {
		t.Fatalf("%s: client certificate not required", where)
	}
	common := d.GetCommonTlsContext()
	if n.Proxyless {
		if common.GetValidationContext().GetCaCertificateProviderInstance().GetCertificateName() != proxyconfig.SecretRootCA {
			t.Fatalf("%s: proxyless server does not validate against the bundle", where)
		}
		h := &hcmv3.HttpConnectionManager{}
		if err := fc.GetFilters()[0].GetTypedConfig().UnmarshalTo(h); err != nil {
			t.Fatal(err)
		}
		first := &rbacv3.RBAC{}
		if err := h.GetHttpFilters()[0].GetTypedConfig().UnmarshalTo(first); err != nil {
			t.Fatalf("%s: first HTTP filter is not RBAC: %v", where, err)
		}
		p := first.GetRules().GetPolicies()["trustmesh-trust-domain"]
		if first.GetRules().GetAction() != rbacconfigv3.RBAC_DENY || p == nil ||
			!strings.Contains(p.GetPrincipals()[0].GetNotId().GetAuthenticated().GetPrincipalName().GetSafeRegex().GetRegex(), "spiffe://cluster\\.local/") {
			t.Fatalf("%s: the trust-domain RBAC rule is missing", where)
		}
		return
	}
	cv := common.GetCombinedValidationContext()
	if cv.GetValidationContextSdsSecretConfig().GetName() != proxyconfig.SecretRootCA {
		t.Fatalf("%s: client certificates not validated against ROOTCA", where)
	}
	sans := cv.GetDefaultValidationContext().GetMatchTypedSubjectAltNames()
	if len(sans) != 1 || sans[0].GetMatcher().GetPrefix() != "spiffe://cluster.local/" || sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_URI {
		t.Fatalf("%s: client certificates not limited to the trust domain: %v", where, sans)
	}
	// HTTP chains authorize every request; TCP chains every connection.
	names := []string{}
	for _, f := range fc.GetFilters() {
		names = append(names, f.GetName())
	}
	if !slices.Contains(names, "envoy.filters.network.ext_authz") && !slices.Contains(names, "envoy.filters.network.http_connection_manager") {
		t.Fatalf("%s: chain %s has no authorization: %v", where, fc.GetName(), names)
	}
}

func checkCluster(t *testing.T, where string, m *mesh.Mesh, n *proxyconfig.Node, c *clusterv3.Cluster, res *proxyconfig.Resources) {
	t.Helper()
	if id, ok := strings.CutPrefix(c.GetName(), proxyconfig.ConnectOriginatePrefix); ok {
		checkTunnelCluster(t, where, c, id)
		return
	}
	if iu := (&internalupstreamv3.InternalUpstreamTransport{}); c.GetTransportSocket().GetTypedConfig().UnmarshalTo(iu) == nil {
		checkHBONECluster(t, where, m, c, iu, res)
		return
	}
	if c.GetType() == clusterv3.Cluster_ORIGINAL_DST || c.GetName() == "PassthroughCluster" {
		t.Fatalf("%s: cluster %s passes traffic through", where, c.GetName())
	}
	var ts = c.GetTransportSocket()
	if ts == nil {
		// Only in-pod clusters and the black hole may be plaintext.
		if c.GetType() != clusterv3.Cluster_STATIC {
			t.Fatalf("%s: plaintext cluster %s of type %s", where, c.GetName(), c.GetType())
		}
		for _, le := range c.GetLoadAssignment().GetEndpoints() {
			for _, e := range le.GetLbEndpoints() {
				a, err := netip.ParseAddr(e.GetEndpoint().GetAddress().GetSocketAddress().GetAddress())
				if err != nil || !a.IsLoopback() {
					t.Fatalf("%s: plaintext cluster %s leaves the pod", where, c.GetName())
				}
			}
		}
		return
	}
	up := &tlsv3.UpstreamTlsContext{}
	if err := ts.GetTypedConfig().UnmarshalTo(up); err != nil {
		t.Fatalf("%s: cluster %s: %v", where, c.GetName(), err)
	}
	common := up.GetCommonTlsContext()
	var got []string
	switch {
	case common.GetCombinedValidationContext() != nil:
		if common.GetCombinedValidationContext().GetValidationContextSdsSecretConfig().GetName() != proxyconfig.SecretRootCA {
			t.Fatalf("%s: cluster %s does not validate against ROOTCA", where, c.GetName())
		}
		if len(common.GetTlsCertificateSdsSecretConfigs()) != 1 || common.GetTlsCertificateSdsSecretConfigs()[0].GetName() != proxyconfig.SecretDefault {
			t.Fatalf("%s: cluster %s does not present the workload certificate", where, c.GetName())
		}
		for _, s := range common.GetCombinedValidationContext().GetDefaultValidationContext().GetMatchTypedSubjectAltNames() {
			if s.GetSanType() != tlsv3.SubjectAltNameMatcher_URI {
				t.Fatalf("%s: cluster %s matches a non-URI SAN", where, c.GetName())
			}
			got = append(got, s.GetMatcher().GetExact())
		}
	case common.GetValidationContext().GetCaCertificateProviderInstance() != nil:
		if !n.Proxyless {
			t.Fatalf("%s: an Envoy got a certificate provider instance", where)
		}
		for _, s := range common.GetValidationContext().GetMatchSubjectAltNames() {
			got = append(got, s.GetExact())
		}
	case common.GetValidationContext().GetTrustedCa() != nil:
		// TLS origination to an external host, by the egress gateway.
		host := up.GetSni()
		sans := common.GetValidationContext().GetMatchTypedSubjectAltNames()
		if c.GetName() == proxyconfig.TracingCluster {
			// The OpenTelemetry collector outside the mesh: its name (a
			// DNS name or an IP) is verified.
			if len(sans) != 1 || sans[0].GetMatcher().GetExact() == "" ||
				(sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_DNS && sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_IP_ADDRESS) {
				t.Fatalf("%s: collector cluster %s does not verify its host name", where, c.GetName())
			}
			return
		}
		if host == "" || len(sans) != 1 || sans[0].GetSanType() != tlsv3.SubjectAltNameMatcher_DNS || sans[0].GetMatcher().GetExact() != host {
			t.Fatalf("%s: external cluster %s does not verify its host name", where, c.GetName())
		}
		if !slices.ContainsFunc(m.External, func(x *mesh.ExternalService) bool { return x.Host == host }) {
			t.Fatalf("%s: cluster to undeclared host %s", where, host)
		}
		return
	default:
		t.Fatalf("%s: cluster %s does not verify its upstream", where, c.GetName())
	}
	if len(got) == 0 {
		t.Fatalf("%s: cluster %s has no SAN matcher", where, c.GetName())
	}
	if c.GetName() == proxyconfig.AuthzCluster {
		return
	}
	// A mesh cluster names exactly its service's workloads, and no
	// ambient pod is reached but through HBONE.
	var want []string
	for _, s := range m.Services {
		for _, p := range s.Ports {
			if proxyconfig.OutboundCluster(p.Port, s.Hostname) == c.GetName() {
				if ambientService(s) {
					t.Fatalf("%s: cluster %s reaches a service with an ambient endpoint without HBONE", where, c.GetName())
				}
				for _, e := range s.Endpoints {
					if !slices.Contains(want, e.Workload.ID.String()) {
						want = append(want, e.Workload.ID.String())
					}
				}
			}
		}
	}
	sort.Strings(want)
	sort.Strings(got)
	if !slices.Equal(got, want) {
		t.Fatalf("%s: cluster %s SANs = %v, want %v", where, c.GetName(), got, want)
	}
}

// checkConnectionManagers: every HTTP connection manager an Envoy gets
// normalizes the host (port and trailing dot) before any filter or route
// sees it; on gateways and sidecar outbound strips client copies of
// x-envoy-external-address before any filter runs, while sidecar inbound
// keeps the copy a gateway forwards (ext_authz believes it only from a
// gateway peer); keeps forwarded-client-cert SANITIZE_SET; and trusts the
// remote address only on a gateway, which overwrites the header itself
// (use_remote_address, xff_num_trusted_hops from the config, no internal
// addresses). Its HTTP filters end with the router, and ext_authz or RBAC
// come after any header mutation filter.
func checkConnectionManagers(t *testing.T, where string, cfg proxyconfig.Config, n *proxyconfig.Node, res *proxyconfig.Resources) {
	t.Helper()
	if n.Proxyless {
		return // grpc-go reads none of these fields
	}
	for _, l := range res.Listeners {
		for _, fc := range l.GetFilterChains() {
			for _, f := range fc.GetFilters() {
				h := &hcmv3.HttpConnectionManager{}
				if f.GetTypedConfig().UnmarshalTo(h) != nil {
					continue
				}
				if fc.GetName() == proxyconfig.ConnectTerminate {
					continue // checkConnectTerminate: CONNECT only, no request reaches a route by host
				}
				at := fmt.Sprintf("%s: listener %s chain %s", where, l.GetName(), fc.GetName())
				gateway := n.Type == proxyconfig.Router
				inbound := !gateway && l.GetTrafficDirection().String() == "INBOUND"
				checkConnectionManager(t, at, cfg, gateway, inbound, h)
			}
		}
	}
}

func checkConnectionManager(t *testing.T, at string, cfg proxyconfig.Config, gateway, sidecarInbound bool, h *hcmv3.HttpConnectionManager) {
	t.Helper()
	if !h.GetStripAnyHostPort() && !h.GetStripMatchingHostPort() {
		t.Fatalf("%s: the host's port is not stripped", at)
	}
	if !h.GetStripTrailingHostDot() {
		t.Fatalf("%s: the host's trailing dot is not stripped", at)
	}
	if h.GetForwardClientCertDetails() != hcmv3.HttpConnectionManager_SANITIZE_SET {
		t.Fatalf("%s: forward_client_cert_details = %s", at, h.GetForwardClientCertDetails())
	}
	if h.GetInternalAddressConfig() != nil || len(h.GetOriginalIpDetectionExtensions()) > 0 {
		t.Fatalf("%s: internal addresses or original IP detection configured", at)
	}
	if got := h.GetUseRemoteAddress().GetValue(); got != gateway {
		t.Fatalf("%s: use_remote_address = %t, want %t (gateway %t)", at, got, gateway, gateway)
	}
	if want := map[bool]uint32{true: cfg.GatewayTrustedHops}[gateway]; h.GetXffNumTrustedHops() != want {
		t.Fatalf("%s: xff_num_trusted_hops = %d, want %d", at, h.GetXffNumTrustedHops(), want)
	}
	stripped := false
	for _, e := range h.GetEarlyHeaderMutationExtensions() {
		hm := &earlyhmv3.HeaderMutation{}
		if e.GetTypedConfig().UnmarshalTo(hm) != nil {
			continue
		}
		for _, mu := range hm.GetMutations() {
			if strings.EqualFold(mu.GetRemove(), "x-envoy-external-address") {
				stripped = true
			}
		}
	}
	filters := h.GetHttpFilters()
	if len(filters) == 0 || filters[len(filters)-1].GetName() != "envoy.filters.http.router" {
		t.Fatalf("%s: the router is not the last HTTP filter", at)
	}
	for _, f := range filters[:len(filters)-1] {
		switch {
		case f.GetName() == "envoy.filters.http.header_mutation":
			hm := &headermutationv3.HeaderMutation{}
			if f.GetTypedConfig().UnmarshalTo(hm) == nil {
				for _, mu := range hm.GetMutations().GetRequestMutations() {
					if strings.EqualFold(mu.GetRemove(), "x-envoy-external-address") {
						stripped = true
					}
				}
			}
		case f.GetName() == "envoy.filters.http.ext_authz" || strings.HasPrefix(f.GetName(), "envoy.filters.http.rbac"):
			if !stripped && !sidecarInbound {
				t.Fatalf("%s: %s runs before client copies of x-envoy-external-address are stripped", at, f.GetName())
			}
		case f.GetName() == "envoy.filters.http.router":
			t.Fatalf("%s: a router before the last filter", at)
		}
	}
	switch {
	case sidecarInbound && stripped:
		t.Fatalf("%s: sidecar inbound strips x-envoy-external-address, so a gateway's forwarded client address never reaches ext_authz", at)
	case !sidecarInbound && !stripped:
		t.Fatalf("%s: client copies of x-envoy-external-address are not stripped", at)
	}
}
