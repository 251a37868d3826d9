// Package proxyconfig computes the xDS resources of one node from the mesh
// model and the AuthorizationPolicies: injected Envoys (sidecars), ingress
// and egress gateways (routers) and proxyless grpc-go clients.
//
// Every path between workloads is mutual TLS with trustmesh certificates:
// listeners that serve a mesh workload require a client certificate
// validated against the trust bundle and naming an ID in the trust domain;
// clusters to mesh endpoints present the workload certificate and check the
// upstream's SPIFFE IDs. Nothing in the mesh model or the policies can turn
// that off (CheckStrict verifies it before anything is published). The
// only plaintext is inside the pod: application to Envoy, Envoy to the
// application on loopback.
package proxyconfig

import (
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"slices"
	"sort"
	"sync"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	originaldstv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/original_dst/v3"
	tlsinspectorv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/listener/tls_inspector/v3"
	hcmv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/filters/network/http_connection_manager/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	"github.com/envoyproxy/go-control-plane/pkg/cache/types"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
)

// Defaults of Config.
const (
	DefaultSDSCluster    = "sds-grpc"
	DefaultInboundPort   = 15006
	DefaultOutboundPort  = 15001
	DefaultSystemRoots   = "/etc/ssl/certs/ca-certificates.crt"
	DefaultRootNamespace = "istio-system"
)

// Config is what resources depend on besides the mesh and the policies.
type Config struct {
	TrustDomain spiffeid.TrustDomain
	// RootNamespace holds mesh-wide AuthorizationPolicies.
	RootNamespace string
	// AuthzHost and AuthzPort reach the ext_authz service, whose
	// certificate must name AuthzID.
	AuthzHost string
	AuthzPort uint32
	AuthzID   spiffeid.ID
	// SDSCluster is the bootstrap cluster that reaches the local agent's
	// SDS socket.
	SDSCluster string
	// InboundPort and OutboundPort are where iptables sends captured
	// traffic.
	InboundPort, OutboundPort uint32
	// SystemRoots is the CA file gateways verify external hosts against
	// when a host names none.
	SystemRoots string
	// GatewayTrustedHops is the gateways' xff_num_trusted_hops: how many
	// proxies in front of them (load balancers) append to
	// X-Forwarded-For, as Istio's gatewayTopology.numTrustedProxies.
	GatewayTrustedHops uint32
	// Tracing gives Envoys' HTTP connection managers an OpenTelemetry
	// tracer; the zero value gives none.
	Tracing Tracing
}

// ErrConfig marks an invalid Config.
var ErrConfig = errors.New("proxyconfig: invalid configuration")

// WithDefaults fills in defaults and checks the configuration.
func (c Config) WithDefaults() (Config, error) {
	if c.RootNamespace == "" {
		c.RootNamespace = DefaultRootNamespace
	}
	if c.SDSCluster == "" {
		c.SDSCluster = DefaultSDSCluster
	}
	if c.InboundPort == 0 {
		c.InboundPort = DefaultInboundPort
	}
	if c.OutboundPort == 0 {
		c.OutboundPort = DefaultOutboundPort
	}
	if c.SystemRoots == "" {
		c.SystemRoots = DefaultSystemRoots
	}
	var errs []error
	if c.TrustDomain.IsZero() {
		errs = append(errs, fmt.Errorf("%w: a trust domain is required", ErrConfig))
	}
	if c.AuthzHost == "" || c.AuthzPort == 0 || c.AuthzPort > 65535 {
		errs = append(errs, fmt.Errorf("%w: the authz service needs a host and a port", ErrConfig))
	}
	if c.AuthzID.IsZero() || c.AuthzID.TrustDomain() != c.TrustDomain {
		errs = append(errs, fmt.Errorf("%w: the authz service's SPIFFE ID %q must be in the trust domain", ErrConfig, c.AuthzID))
	}
	if err := c.Tracing.check(); err != nil {
		errs = append(errs, err)
	}
	return c, errors.Join(errs...)
}

// ErrIdentity marks a node whose service account is not the one the mesh
// model gives its pod.
var ErrIdentity = errors.New("proxyconfig: node identity does not match the mesh")

// Resources are one node's xDS resources.
type Resources struct {
	Listeners []*listenerv3.Listener
	Clusters  []*clusterv3.Cluster
	Routes    []*routev3.RouteConfiguration
	Endpoints []*endpointv3.ClusterLoadAssignment
	Secrets   []*tlsv3.Secret
	// Warnings say what was left out, and why.
	Warnings []string
	// Refusals are policies refused for this node (proxyless workloads
	// cannot enforce some fields): the node denies every request instead.
	Refusals []string
}

// ByType returns the resources keyed by type URL.
func (r *Resources) ByType() map[resource.Type][]types.Resource {
	out := map[resource.Type][]types.Resource{}
	add := func(t resource.Type, n int, get func(int) types.Resource) {
		rs := make([]types.Resource, n)
		for i := range n {
			rs[i] = get(i)
		}
		out[t] = rs
	}
	add(resource.ListenerType, len(r.Listeners), func(i int) types.Resource { return r.Listeners[i] })
	add(resource.ClusterType, len(r.Clusters), func(i int) types.Resource { return r.Clusters[i] })
	add(resource.RouteType, len(r.Routes), func(i int) types.Resource { return r.Routes[i] })
	add(resource.EndpointType, len(r.Endpoints), func(i int) types.Resource { return r.Endpoints[i] })
	add(resource.SecretType, len(r.Secrets), func(i int) types.Resource { return r.Secrets[i] })
	return out
}

// Builder computes resources for nodes from one mesh and one policy set.
// Resources shared by many nodes are computed once and shared: callers
// must not modify what Build returns.
type Builder struct {
	cfg      Config
	mesh     *mesh.Mesh
	policies []*policy.Policy

	sidecarOnce sync.Once
	sidecar     *Resources
	grpcOnce    sync.Once
	grpc        *Resources
	tracerOnce  sync.Once
	tracer      *tracer
	// byWorkload indexes the mesh's service endpoints by their workload's
	// key, in mesh order, so that a node's inbound side does not scan the
	// whole mesh.
	byWorkloadOnce sync.Once
	byWorkload     map[string][]workloadEndpoint
}

// workloadEndpoint is one endpoint of a service, found by its workload.
type workloadEndpoint struct {
	service  *mesh.Service
	endpoint mesh.Endpoint
}

// endpointsOf returns the service endpoints whose workload is key's, in
// the order the mesh lists services and their endpoints.
func (b *Builder) endpointsOf(key string) []workloadEndpoint {
	b.byWorkloadOnce.Do(func() {
		b.byWorkload = map[string][]workloadEndpoint{}
		for _, s := range b.mesh.Services {
			for _, e := range s.Endpoints {
				k := e.Workload.Key()
				b.byWorkload[k] = append(b.byWorkload[k], workloadEndpoint{service: s, endpoint: e})
			}
		}
	})
	return b.byWorkload[key]
}

// NewBuilder returns a Builder. cfg must have passed WithDefaults.
func NewBuilder(cfg Config, m *mesh.Mesh, policies []*policy.Policy) *Builder {
	return &Builder{cfg: cfg, mesh: m, policies: policies}
}

// Mesh returns the mesh the builder uses.
func (b *Builder) Mesh() *mesh.Mesh { return b.mesh }

// ErrUnknownWorkload marks a node whose pod the mesh does not know. The
// mesh is authoritative (every pod on Kubernetes, every workload of the
// mesh files), so such a node gets no configuration at all.
var ErrUnknownWorkload = errors.New("proxyconfig: the node's pod is not in the mesh")

// ErrAmbientWorkload marks an Envoy sidecar of a pod the mesh says is
// ambient: its node proxy captures it, so no sidecar may configure its
// traffic too.
var ErrAmbientWorkload = errors.New("proxyconfig: the node's pod is ambient and has no sidecar")

// Workload resolves the node's workload in the mesh, checking that its
// service account is the node's. A pod the mesh does not know is refused.
func (b *Builder) Workload(n *Node) (*mesh.Workload, error) {
	w := b.mesh.Workload(n.Namespace, n.Pod)
	if w == nil {
		return nil, fmt.Errorf("%w: pod %s/%s", ErrUnknownWorkload, n.Namespace, n.Pod)
	}
	if w.ServiceAccount != n.ServiceAccount {
		return nil, fmt.Errorf("%w: pod %s runs as %s, not %s", ErrIdentity, w.Key(), w.ServiceAccount, n.ServiceAccount)
	}
	return w, nil
}

// Build computes the node's resources. What configures the node (the
// gateways that select it, the policies that apply to it) follows from
// what the mesh says about its pod, never from the labels the node
// reports.
func (b *Builder) Build(n *Node) (*Resources, error) {
	w, err := b.Workload(n)
	if err != nil {
		return nil, err
	}
	switch {
	case n.Type == Sidecar && !n.Proxyless && w.Mode() == mesh.DataPlaneAmbient:
		return nil, fmt.Errorf("%w: pod %s is captured by its node proxy", ErrAmbientWorkload, w.Key())
	case n.Proxyless:
		return b.buildProxyless(n, w, w.Labels), nil
	case n.Type == Router:
		return b.buildGateway(n, w), nil
	default:
		return b.buildSidecar(w), nil
	}
}

// servedPort is one target port a workload serves, with the services it
// serves there.
type servedPort struct {
	target   uint32
	protocol mesh.Protocol
	services []string
}

// served lists the ports a workload serves, by target port.
func (b *Builder) served(w *mesh.Workload) []*servedPort {
	if w == nil {
		return nil
	}
	by := map[uint32]*servedPort{}
	for _, we := range b.endpointsOf(w.Key()) {
		s, e := we.service, we.endpoint
		for _, p := range s.Ports {
			t := e.TargetPort(p)
			sp := by[t]
			if sp == nil {
				sp = &servedPort{target: t, protocol: p.Protocol}
				by[t] = sp
			} else if sp.protocol != p.Protocol {
				// Two services disagree on the protocol of one port:
				// treat it as TCP, which is still authorized.
				sp.protocol = mesh.TCP
			}
			sp.services = append(sp.services, s.Key())
		}
	}
	out := make([]*servedPort, 0, len(by))
	for _, sp := range by {
		out = append(out, sp)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].target < out[j].target })
	return out
}

// workloadIDs are the distinct SPIFFE IDs of a service's endpoints, sorted.
func workloadIDs(s *mesh.Service) []string {
	var ids []string
	for _, e := range s.Endpoints {
		id := e.Workload.ID.String()
		if !slices.Contains(ids, id) {
			ids = append(ids, id)
		}
	}
	sort.Strings(ids)
	return ids
}

// endpoints is the load assignment of one service port.
func endpoints(name string, s *mesh.Service, p mesh.Port) *endpointv3.ClusterLoadAssignment {
	// grpc-go needs a locality (an empty one will do) with a weight.
	la := &endpointv3.LocalityLbEndpoints{Locality: &corev3.Locality{}, LoadBalancingWeight: wrapperspb.UInt32(1)}
	for _, e := range s.Endpoints {
		la.LbEndpoints = append(la.LbEndpoints, lbEndpoint(e.Address, e.TargetPort(p)))
	}
	return &endpointv3.ClusterLoadAssignment{ClusterName: name, Endpoints: []*endpointv3.LocalityLbEndpoints{la}}
}

// meshClusters are the outbound clusters to every mesh service port that
// has endpoints, and their endpoints, for Envoy: mTLS to the endpoints'
// sidecars, or HBONE (hbone.go) for a service with an ambient endpoint,
// with one internal listener and tunnel cluster per identity reached so.
func (b *Builder) meshClusters(r *Resources) {
	var hboneIDs []string
	for _, s := range b.mesh.Services {
		if len(s.Endpoints) == 0 {
			continue
		}
		ids := workloadIDs(s)
		hbone := viaHBONE(s)
		if hbone {
			for _, id := range ids {
				if !slices.Contains(hboneIDs, id) {
					hboneIDs = append(hboneIDs, id)
				}
			}
		}
		for _, p := range s.Ports {
			name := OutboundCluster(p.Port, s.Hostname)
			var c *clusterv3.Cluster
			if hbone {
				c = hboneCluster(name, s, p)
			} else {
				c = edsCluster(name)
				c.TransportSocket = b.meshClientTLS(fmt.Sprintf("outbound_.%d_._.%s", p.Port, s.Hostname), ids)
				r.Endpoints = append(r.Endpoints, endpoints(name, s, p))
			}
			if p.Protocol == mesh.HTTP2 || p.Protocol == mesh.GRPC {
				c.TypedExtensionProtocolOptions = http2Options()
			}
			r.Clusters = append(r.Clusters, c)
		}
	}
	sort.Strings(hboneIDs)
	for _, id := range hboneIDs {
		l, c := b.hboneOriginate(id)
		r.Listeners = append(r.Listeners, l)
		r.Clusters = append(r.Clusters, c)
	}
}

// domains lists the names a service is called by on a port.
func domains(s *mesh.Service, port uint32) []string {
	short := s.Name + "." + s.Namespace
	names := []string{s.Hostname, short, short + ".svc"}
	if s.Address != "" {
		names = append(names, s.Address)
	}
	var out []string
	for _, n := range names {
		out = append(out, n, fmt.Sprintf("%s:%d", n, port))
	}
	return out
}

// addVirtualHost adds a virtual host, leaving out domains another virtual
// host of the route configuration already has (Envoy refuses duplicates).
func addVirtualHost(rc *routev3.RouteConfiguration, seen map[string]bool, name string, doms []string, routes ...*routev3.Route) {
	var keep []string
	for _, d := range doms {
		if !seen[d] {
			seen[d] = true
			keep = append(keep, d)
		}
	}
	if len(keep) == 0 {
		return
	}
	rc.VirtualHosts = append(rc.VirtualHosts, &routev3.VirtualHost{Name: name, Domains: keep, Routes: routes})
}

// sidecarShared computes what every sidecar gets: the outbound side.
func (b *Builder) sidecarShared() *Resources {
	b.sidecarOnce.Do(func() {
		r := &Resources{}
		b.meshClusters(r)
		r.Clusters = append(r.Clusters, b.authzCluster(), &clusterv3.Cluster{
			Name:                 BlackHoleCluster,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_STATIC},
		})
		b.addTracing(r)

		type portServices struct {
			http bool
			tcp  []*mesh.Service
		}
		ports := map[uint32]*portServices{}
		routes := map[uint32]*routev3.RouteConfiguration{}
		seen := map[uint32]map[string]bool{}
		route := func(port uint32) *routev3.RouteConfiguration {
			if routes[port] == nil {
				routes[port] = &routev3.RouteConfiguration{Name: fmt.Sprint(port), ValidateClusters: wrapperspb.Bool(false)}
				seen[port] = map[string]bool{}
			}
			return routes[port]
		}
		for _, s := range b.mesh.Services {
			if len(s.Endpoints) == 0 {
				continue
			}
			for _, p := range s.Ports {
				if p.Port == b.cfg.InboundPort || p.Port == b.cfg.OutboundPort || p.Port == HBONEPort {
					r.Warnings = append(r.Warnings, fmt.Sprintf("service %s: port %d is a capture port; left out", s.Key(), p.Port))
					continue
				}
				ps := ports[p.Port]
				if ps == nil {
					ps = &portServices{}
					ports[p.Port] = ps
				}
				if p.Protocol.IsHTTP() {
					ps.http = true
					addVirtualHost(route(p.Port), seen[p.Port], fmt.Sprintf("%s:%d", s.Hostname, p.Port), domains(s, p.Port),
						routeTo(OutboundCluster(p.Port, s.Hostname)))
				} else {
					ps.tcp = append(ps.tcp, s)
				}
			}
		}
		// External hosts are reached only through the egress gateway.
		if g := b.mesh.EgressGateway(); g != nil {
			gs := b.mesh.Service(g.Namespace + "/" + g.Service)
			if gs != nil && len(gs.Endpoints) > 0 {
				for _, x := range b.mesh.External {
					for _, p := range x.Ports {
						if p.Port == b.cfg.InboundPort || p.Port == b.cfg.OutboundPort || p.Port == HBONEPort {
							continue
						}
						if ports[p.Port] == nil {
							ports[p.Port] = &portServices{}
						}
						ports[p.Port].http = true
						addVirtualHost(route(p.Port), seen[p.Port], fmt.Sprintf("%s:%d", x.Host, p.Port),
							[]string{x.Host, fmt.Sprintf("%s:%d", x.Host, p.Port)}, routeTo(OutboundCluster(g.Port, gs.Hostname)))
					}
				}
			}
		}
		portList := make([]uint32, 0, len(ports))
		for p := range ports {
			portList = append(portList, p)
		}
		slices.Sort(portList)
		for _, port := range portList {
			ps := ports[port]
			l := &listenerv3.Listener{
				Name:             fmt.Sprintf("0.0.0.0_%d", port),
				Address:          socketAddress("0.0.0.0", port),
				BindToPort:       wrapperspb.Bool(false),
				TrafficDirection: corev3.TrafficDirection_OUTBOUND,
			}
			defaultTaken := false
			if ps.http {
				l.FilterChains = append(l.FilterChains, &listenerv3.FilterChain{
					Name:    fmt.Sprintf("outbound_http_%d", port),
					Filters: []*listenerv3.Filter{b.hcm(sidecarOutboundHCM, fmt.Sprintf("outbound_0.0.0.0_%d", port), []*hcmv3.HttpFilter{routerFilter()}, fmt.Sprint(port), nil, "")},
				})
				r.Routes = append(r.Routes, routes[port])
				defaultTaken = true
			}
			for _, s := range ps.tcp {
				cluster := OutboundCluster(port, s.Hostname)
				fc := &listenerv3.FilterChain{Name: cluster, Filters: []*listenerv3.Filter{tcpProxy(cluster, cluster)}}
				switch {
				case s.Address != "":
					fc.FilterChainMatch = &listenerv3.FilterChainMatch{PrefixRanges: []*corev3.CidrRange{cidr(s.Address)}}
				case !defaultTaken && len(ps.tcp) == 1:
					defaultTaken = true
				default:
					r.Warnings = append(r.Warnings, fmt.Sprintf("service %s: TCP port %d is shared and the service has no address; left out", s.Key(), port))
					continue
				}
				l.FilterChains = append(l.FilterChains, fc)
			}
			if len(l.FilterChains) > 0 {
				r.Listeners = append(r.Listeners, l)
			}
		}
		r.Listeners = append(r.Listeners, &listenerv3.Listener{
			Name:             VirtualOutbound,
			Address:          socketAddress("0.0.0.0", b.cfg.OutboundPort),
			UseOriginalDst:   wrapperspb.Bool(true),
			TrafficDirection: corev3.TrafficDirection_OUTBOUND,
			// Registry-only: whatever matches no mesh port goes nowhere.
			FilterChains: []*listenerv3.FilterChain{{
				Name:    BlackHoleCluster,
				Filters: []*listenerv3.Filter{tcpProxy(BlackHoleCluster, BlackHoleCluster)},
			}},
		})
		b.sidecar = r
	})
	return b.sidecar
}

func cidr(addr string) *corev3.CidrRange {
	bits := uint32(32)
	for _, c := range addr {
		if c == ':' {
			bits = 128
			break
		}
	}
	return &corev3.CidrRange{AddressPrefix: addr, PrefixLen: wrapperspb.UInt32(bits)}
}

// buildSidecar adds the workload's inbound side to the shared outbound
// side.
func (b *Builder) buildSidecar(w *mesh.Workload) *Resources {
	shared, own := b.sidecarShared(), b.sidecarOwn(w)
	return &Resources{
		Listeners: slices.Concat(shared.Listeners, own.Listeners),
		Clusters:  slices.Concat(shared.Clusters, own.Clusters),
		Routes:    shared.Routes,
		Endpoints: shared.Endpoints,
		Warnings:  slices.Concat(shared.Warnings, own.Warnings),
	}
}

// SidecarOwn returns what Build adds, for an Envoy sidecar node, to the
// outbound side every sidecar of this Builder shares: the node's inbound
// listener and clusters, which follow from its pod. ok is false for a
// node of any other kind (a gateway, a proxyless client, an ambient pod),
// whose resources are all its own. Two sidecars of one namespace and
// service account whose own resources are equal get equal resources from
// Build.
func (b *Builder) SidecarOwn(n *Node) (own *Resources, ok bool, err error) {
	w, err := b.Workload(n)
	if err != nil {
		return nil, false, err
	}
	if n.Type != Sidecar || n.Proxyless || w.Mode() == mesh.DataPlaneAmbient {
		return nil, false, nil
	}
	return b.sidecarOwn(w), true, nil
}

// SidecarOwnInputs encodes everything of the mesh that sidecarOwn reads
// for the node: its workload's namespace, name, labels and addresses, the
// ports it serves (served), and the tracer the mesh gives. Two Builders of
// one Config give a node equal own resources (SidecarOwn) whenever they
// give it equal inputs: callers may reuse what they derived from one for
// the other. ok is false where SidecarOwn's is. Anything sidecarOwn comes
// to read from the mesh must be added here (TestSidecarOwnInputs).
func (b *Builder) SidecarOwnInputs(n *Node) (inputs string, ok bool, err error) {
	w, err := b.Workload(n)
	if err != nil {
		return "", false, err
	}
	if n.Type != Sidecar || n.Proxyless || w.Mode() == mesh.DataPlaneAmbient {
		return "", false, nil
	}
	var enc []byte
	field := func(s string) {
		enc = binary.AppendUvarint(enc, uint64(len(s)))
		enc = append(enc, s...)
	}
	field(w.Namespace)
	field(w.Name)
	field(string(w.Mode()))
	keys := slices.Sorted(maps.Keys(w.Labels))
	enc = binary.AppendUvarint(enc, uint64(len(keys)))
	for _, k := range keys {
		field(k)
		field(w.Labels[k])
	}
	served := b.served(w)
	enc = binary.AppendUvarint(enc, uint64(len(served)))
	for _, sp := range served {
		enc = binary.AppendUvarint(enc, uint64(sp.target))
		field(string(sp.protocol))
		enc = binary.AppendUvarint(enc, uint64(len(sp.services)))
		for _, s := range sp.services {
			field(s)
		}
	}
	addrs := b.workloadAddresses(w)
	enc = binary.AppendUvarint(enc, uint64(len(addrs)))
	for _, a := range addrs {
		field(a)
	}
	if t := b.tracerFor(); t != nil {
		field("tracer")
		field(t.host)
		field(t.cluster)
	} else {
		field("")
	}
	return string(enc), true, nil
}

// sidecarOwn is a sidecar's inbound side.
func (b *Builder) sidecarOwn(w *mesh.Workload) *Resources {
	r := &Resources{}
	in := &listenerv3.Listener{
		Name:             VirtualInbound,
		Address:          socketAddress("0.0.0.0", b.cfg.InboundPort),
		TrafficDirection: corev3.TrafficDirection_INBOUND,
		ListenerFilters: []*listenerv3.ListenerFilter{
			{Name: "envoy.filters.listener.original_dst", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&originaldstv3.OriginalDst{})}},
			{Name: "envoy.filters.listener.tls_inspector", ConfigType: &listenerv3.ListenerFilter_TypedConfig{TypedConfig: mustAny(&tlsinspectorv3.TlsInspector{})}},
		},
	}
	var served []*servedPort
	for _, sp := range b.served(w) {
		if sp.target == HBONEPort {
			r.Warnings = append(r.Warnings, fmt.Sprintf("workload %s: target port %d is where the sidecar accepts HBONE; left out", w.Key(), sp.target))
			continue
		}
		served = append(served, sp)
	}
	for _, sp := range served {
		cluster := InboundCluster(sp.target)
		c := staticCluster(cluster, "127.0.0.1", sp.target)
		fc := &listenerv3.FilterChain{
			Name:             cluster,
			FilterChainMatch: &listenerv3.FilterChainMatch{DestinationPort: wrapperspb.UInt32(sp.target)},
		}
		if sp.protocol.IsHTTP() {
			if sp.protocol != mesh.HTTP {
				c.TypedExtensionProtocolOptions = http2Options()
			}
			fc.TransportSocket = b.meshServerTLS("h2", "http/1.1")
			fc.Filters = []*listenerv3.Filter{b.hcm(sidecarInboundHCM, fmt.Sprintf("inbound_%d", sp.target), []*hcmv3.HttpFilter{httpAuthzFilter(), routerFilter()}, "",
				&routev3.RouteConfiguration{Name: cluster, VirtualHosts: []*routev3.VirtualHost{{
					Name: fmt.Sprintf("inbound|http|%d", sp.target), Domains: []string{"*"}, Routes: []*routev3.Route{routeTo(cluster)},
				}}}, canonicalService(w))}
		} else {
			fc.TransportSocket = b.meshServerTLS()
			fc.Filters = []*listenerv3.Filter{networkAuthzFilter(), tcpProxy(fmt.Sprintf("inbound_%d", sp.target), cluster)}
		}
		in.FilterChains = append(in.FilterChains, fc)
		r.Clusters = append(r.Clusters, c)
	}
	if len(in.FilterChains) > 0 {
		// Ambient pods (and other sidecars) reach the workload over HBONE.
		if addrs := b.workloadAddresses(w); len(addrs) > 0 {
			in.FilterChains = append(in.FilterChains, b.hboneInbound(w, addrs, served))
		} else {
			r.Warnings = append(r.Warnings, fmt.Sprintf("workload %s has no address: it accepts no HBONE", w.Key()))
		}
		r.Listeners = append(r.Listeners, in)
	} else {
		r.Warnings = append(r.Warnings, fmt.Sprintf("workload %s serves no port: no inbound listener", w.Key()))
	}
	return r
}
