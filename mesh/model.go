// Package mesh is trustmesh's model of the mesh: the services, their
// endpoints and the workloads behind them (with their SPIFFE IDs and
// labels), the external hosts that may be reached through the egress
// gateway, the gateways themselves and the TLS secrets they serve.
//
// The model is built from Kubernetes (Services, EndpointSlices, Pods,
// ServiceEntries, Secrets and PeerAuthentications; see package
// mesh/kube) or from a directory of YAML files (Dir), and feeds xds/,
// authz/ and injector/. A Mesh is immutable once returned by a Source:
// consumers share it without copying.
package mesh

import (
	"errors"
	"fmt"
	"net/netip"
	"path"
	"slices"
	"sort"
	"strconv"
	"strings"
	"sync"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"
)

// Protocol is the application protocol of a port.
type Protocol string

// The protocols a port may declare.
const (
	HTTP  Protocol = "HTTP"
	HTTP2 Protocol = "HTTP2"
	GRPC  Protocol = "GRPC"
	TCP   Protocol = "TCP"
)

// IsHTTP reports whether the port carries HTTP (and so gets an HTTP
// connection manager).
func (p Protocol) IsHTTP() bool { return p == HTTP || p == HTTP2 || p == GRPC }

// ErrInvalid marks a mesh that fails validation.
var ErrInvalid = errors.New("mesh: invalid")

// Mesh is one consistent view of the mesh.
type Mesh struct {
	Services []*Service
	// Workloads are the workloads the mesh knows besides the endpoints of
	// its services: clients that serve nothing, gateways without a
	// service. A workload may be listed here and as an endpoint. The
	// xDS server configures only workloads the mesh knows (Workload), so
	// a source must list every workload: on Kubernetes every pod.
	Workloads []*Workload
	External  []*ExternalService
	Gateways  []*Gateway
	Secrets   []*Secret
	// Nodes are the nodes declared by mesh files (kind Node), off
	// Kubernetes: each lists the identities its node agent may hold and how
	// it attests the local processes that receive them. On Kubernetes the
	// pods on a node say that instead (WorkloadsOnNode), and off it the
	// ambient workloads that name the node do too.
	Nodes []*Node
	// Refusals are objects the source read and refused to honour, such as a
	// PeerAuthentication asking for PERMISSIVE mTLS. Consumers log them.
	Refusals []Refusal

	// byKey indexes every workload by Key, built on the first lookup: a
	// Mesh is not changed once it is looked up.
	indexOnce sync.Once
	byKey     map[workloadKey]*Workload
	byNode    map[string][]*Workload
	byAddr    map[netip.Addr]*Workload
}

// Node is a node declared by the mesh files: the identities its node agent
// may hold, each with the selectors a local process must all match to
// receive it.
type Node struct {
	Name      string
	Workloads []NodeWorkload
}

// NodeWorkload is one identity a node may hold. Selectors are "type:value"
// strings with the Selector* prefixes; there is at least one.
type NodeWorkload struct {
	ID        spiffeid.ID
	Selectors []string
}

// Selector prefixes of NodeWorkload.Selectors. They are the node service's
// (api/ca/v1), copied so that the model knows none of its consumers.
const (
	SelectorUID    = "unix:uid:"
	SelectorGID    = "unix:gid:"
	SelectorPath   = "unix:path:"
	SelectorSHA256 = "unix:sha256:"
	SelectorNetns  = "netns:"
	SelectorPodUID = "k8s:pod-uid:"
)

// Node returns the node the mesh files declare by that name, or nil.
func (m *Mesh) Node(name string) *Node {
	for _, n := range m.Nodes {
		if n.Name == name {
			return n
		}
	}
	return nil
}

// WorkloadsOnNode lists the workloads that run on the node name: pods by
// their spec.nodeName on Kubernetes, the file workloads that name it off
// it; nil for an empty name.
// The slice is shared: callers must not change it.
func (m *Mesh) WorkloadsOnNode(name string) []*Workload {
	if name == "" {
		return nil
	}
	m.index()
	return m.byNode[name]
}

// Refusal is an object the mesh refuses to honour, and why.
type Refusal struct {
	Object string
	Reason string
}

func (r Refusal) String() string { return r.Object + ": " + r.Reason }

// Service is a mesh service: a name, ports and the endpoints that serve it.
type Service struct {
	Namespace string
	Name      string
	// Hostname is the service's DNS name, NAME.NAMESPACE.svc.DOMAIN.
	Hostname string
	// Address is the service's virtual IP, if it has one.
	Address   string
	Ports     []Port
	Endpoints []Endpoint
}

// Key is "namespace/name".
func (s *Service) Key() string { return s.Namespace + "/" + s.Name }

// Port is one port of a service.
type Port struct {
	Name     string
	Port     uint32
	Protocol Protocol
	// TargetPort is the port the workloads listen on; zero means Port.
	TargetPort uint32
}

// Target is the port the workloads listen on.
func (p Port) Target() uint32 {
	if p.TargetPort == 0 {
		return p.Port
	}
	return p.TargetPort
}

// Endpoint is one workload serving a service.
type Endpoint struct {
	Address string
	// Ports overrides the service's target port by port name, for workloads
	// that share an address (local mode on one machine).
	Ports    map[string]uint32
	Workload *Workload
}

// TargetPort is the port this endpoint serves the service port p on.
func (e Endpoint) TargetPort(p Port) uint32 {
	if t, ok := e.Ports[p.Name]; ok {
		return t
	}
	return p.Target()
}

// Workload is a pod (or a process, off Kubernetes).
type Workload struct {
	Namespace string
	// Name is the pod's name; the node id of its proxy names it.
	Name           string
	ServiceAccount string
	// ID is the workload's SPIFFE ID, spiffe://TD/ns/NS/sa/SA.
	ID     spiffeid.ID
	Labels map[string]string
	// Node is the node the pod runs on (its spec.nodeName), or off
	// Kubernetes the node the mesh file names: empty for a pod not
	// scheduled yet, and for a pod that has finished (Succeeded or
	// Failed), which runs nowhere.
	Node string
	// UID is the pod's UID; empty off Kubernetes.
	UID string
	// Addresses are the workload's IP addresses (IPv4 and IPv6) as text:
	// the pod's IPs on Kubernetes (none for a pod on the host network,
	// whose address is its node's), the file's addresses off it. The node
	// proxy finds the destination of a captured connection by them.
	Addresses []string
	// DataPlaneMode says how the workload's traffic is carried; use Mode,
	// which reads the zero value as DataPlaneSidecar.
	DataPlaneMode DataPlaneMode
	// Netns is, off Kubernetes, the network namespace the node proxy
	// captures an ambient workload in: a name under /run/netns or an
	// absolute path. Empty on Kubernetes, where the node proxy finds the
	// pod's namespace from its processes.
	Netns string
}

// DataPlaneMode is how a workload's traffic is carried.
type DataPlaneMode string

// The data-plane modes.
const (
	// DataPlaneSidecar: an Envoy sidecar (an injected pod), which also
	// accepts HBONE on port 15008. The zero value means it too: every
	// workload had a sidecar before ambient mode.
	DataPlaneSidecar DataPlaneMode = "sidecar"
	// DataPlaneAmbient: captured by the node proxy of its Node, reached
	// over HBONE on port 15008 of its own address.
	DataPlaneAmbient DataPlaneMode = "ambient"
	// DataPlaneNone: not in the mesh, no proxy: it speaks plaintext, which
	// no meshed workload accepts.
	DataPlaneNone DataPlaneMode = "none"
)

// ParseDataPlaneMode parses "ambient", "sidecar" or "none".
func ParseDataPlaneMode(s string) (DataPlaneMode, error) {
	switch m := DataPlaneMode(s); m {
	case DataPlaneAmbient, DataPlaneSidecar, DataPlaneNone:
		return m, nil
	}
	return "", fmt.Errorf("%q is not %s, %s or %s", s, DataPlaneAmbient, DataPlaneSidecar, DataPlaneNone)
}

// Mode is the workload's data-plane mode, DataPlaneSidecar when unset.
func (w *Workload) Mode() DataPlaneMode {
	if w.DataPlaneMode == "" {
		return DataPlaneSidecar
	}
	return w.DataPlaneMode
}

// Key is "namespace/name".
func (w *Workload) Key() string { return w.Namespace + "/" + w.Name }

// workloadKey is a workload's namespace and name: a map key, which unlike
// Key costs no allocation (a mesh's workloads are indexed on every load).
type workloadKey struct{ namespace, name string }

func (w *Workload) key() workloadKey { return workloadKey{w.Namespace, w.Name} }

// ExternalService is a host outside the mesh that sidecars may reach, only
// through the egress gateway.
type ExternalService struct {
	// Namespace and Name identify the declaration (a ServiceEntry).
	Namespace string
	Name      string
	Host      string
	Ports     []ExternalPort
	// CAFile, when set, is the CA bundle the egress gateway verifies the
	// host against instead of the system roots.
	CAFile string
}

// ExternalPort is a port of an external host. The application speaks
// Protocol (HTTP) to its sidecar; the egress gateway originates TLS to
// TLSPort on the host.
type ExternalPort struct {
	Name     string
	Port     uint32
	Protocol Protocol
	// TLSPort is the port the egress gateway originates TLS to; zero means
	// Port.
	TLSPort uint32
}

// Target is the port TLS is originated to.
func (p ExternalPort) Target() uint32 {
	if p.TLSPort == 0 {
		return p.Port
	}
	return p.TLSPort
}

// GatewayKind says which way a gateway faces.
type GatewayKind string

// The kinds of gateways.
const (
	Ingress GatewayKind = "ingress"
	Egress  GatewayKind = "egress"
)

// Gateway configures gateway workloads: those in its namespace whose labels
// include Selector.
type Gateway struct {
	Namespace string
	Name      string
	Kind      GatewayKind
	Selector  map[string]string
	// Servers are the ingress gateway's external TLS listeners.
	Servers []Server
	// Service is the mesh service (in the gateway's namespace) through
	// which sidecars reach an egress gateway; Port is its port for mesh
	// mTLS.
	Service string
	Port    uint32
}

// Key is "namespace/name".
func (g *Gateway) Key() string { return g.Namespace + "/" + g.Name }

// Selects reports whether the gateway configures a workload with these
// labels in namespace ns.
func (g *Gateway) Selects(ns string, labels map[string]string) bool {
	if ns != g.Namespace || len(g.Selector) == 0 {
		return false
	}
	for k, v := range g.Selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

// Server is one external TLS listener of an ingress gateway.
type Server struct {
	Port  uint32
	Hosts []string
	// CredentialName names the TLS Secret, in the gateway's namespace,
	// with the server's certificate and key.
	CredentialName string
	Routes         []Route
}

// Route sends requests for a host (and path prefix) to a mesh service.
type Route struct {
	Host       string
	PathPrefix string
	// Service is "namespace/name" of a mesh service; Port its port.
	Service string
	Port    uint32
}

// Secret is a TLS certificate and key for a gateway.
type Secret struct {
	Namespace string
	Name      string
	CertPEM   []byte
	KeyPEM    []byte
}

// Key is "namespace/name".
func (s *Secret) Key() string { return s.Namespace + "/" + s.Name }

// Service returns the service namespace/name, or nil.
func (m *Mesh) Service(key string) *Service {
	for _, s := range m.Services {
		if s.Key() == key {
			return s
		}
	}
	return nil
}

// Workload finds a workload by namespace and pod name, among the
// endpoints of services and the other workloads.
func (m *Mesh) Workload(ns, name string) *Workload {
	m.index()
	return m.byKey[workloadKey{ns, name}]
}

func (m *Mesh) index() {
	m.indexOnce.Do(func() {
		m.byKey = map[workloadKey]*Workload{}
		m.byNode = map[string][]*Workload{}
		m.byAddr = map[netip.Addr]*Workload{}
		claimed := map[netip.Addr]bool{}
		for _, w := range m.AllWorkloads() {
			m.byKey[w.key()] = w
			if w.Node != "" {
				m.byNode[w.Node] = append(m.byNode[w.Node], w)
			}
			for _, a := range w.Addresses {
				ip, err := netip.ParseAddr(a)
				if err != nil {
					continue
				}
				ip = ip.Unmap()
				if claimed[ip] {
					// Two workloads claim it (Validate refuses that):
					// neither is found by it.
					delete(m.byAddr, ip)
					continue
				}
				claimed[ip] = true
				m.byAddr[ip] = w
			}
		}
	})
}

// WorkloadByAddress finds the workload that has addr among its Addresses,
// or nil; an address two workloads claim finds neither.
func (m *Mesh) WorkloadByAddress(addr netip.Addr) *Workload {
	m.index()
	return m.byAddr[addr.Unmap()]
}

// AllWorkloads lists every workload the mesh knows once, endpoints first.
func (m *Mesh) AllWorkloads() []*Workload {
	seen := make(map[workloadKey]bool, len(m.Workloads))
	out := make([]*Workload, 0, len(m.Workloads))
	add := func(w *Workload) {
		if w != nil && !seen[w.key()] {
			seen[w.key()] = true
			out = append(out, w)
		}
	}
	for _, s := range m.Services {
		for _, e := range s.Endpoints {
			add(e.Workload)
		}
	}
	for _, w := range m.Workloads {
		add(w)
	}
	return out
}

// GatewayWorkloads are the workloads a gateway configures: those the mesh
// knows in its namespace whose labels, as the mesh has them, include its
// selector. Labels a proxy reports about itself play no part.
func (m *Mesh) GatewayWorkloads(g *Gateway) []*Workload {
	var out []*Workload
	for _, w := range m.AllWorkloads() {
		if g.Selects(w.Namespace, w.Labels) {
			out = append(out, w)
		}
	}
	return out
}

// MayReadSecret reports whether the service account sa of namespace ns
// may be sent the gateway secret ns/name: only when it runs a workload of
// an ingress gateway of ns that serves that secret. As Istio authorizes
// credentialName secrets per service account of the gateway's own
// namespace, never across namespaces.
func (m *Mesh) MayReadSecret(ns, sa, name string) bool {
	for _, g := range m.Gateways {
		if g.Namespace != ns || g.Kind != Ingress {
			continue
		}
		serves := false
		for _, sv := range g.Servers {
			if sv.CredentialName == name {
				serves = true
			}
		}
		if !serves {
			continue
		}
		for _, w := range m.GatewayWorkloads(g) {
			if w.ServiceAccount == sa {
				return true
			}
		}
	}
	return false
}

// Secret returns the secret namespace/name, or nil.
func (m *Mesh) Secret(ns, name string) *Secret {
	for _, s := range m.Secrets {
		if s.Namespace == ns && s.Name == name {
			return s
		}
	}
	return nil
}

// Validate checks the mesh against a trust domain: names are unique, ports
// and addresses parse, every workload's SPIFFE ID is
// spiffe://TD/ns/NS/sa/SA of its own namespace, and references resolve. It
// reports every problem.
func (m *Mesh) Validate(td spiffeid.TrustDomain) error {
	var errs []error
	fail := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...))
	}
	services := map[string]bool{}
	hosts := map[string]string{}
	workloads := make(map[workloadKey]*Workload, len(m.Workloads))
	for _, s := range m.Services {
		if s.Namespace == "" || s.Name == "" || s.Hostname == "" {
			fail("service %q: namespace, name and hostname are required", s.Key())
			continue
		}
		if services[s.Key()] {
			fail("service %s is declared twice", s.Key())
		}
		services[s.Key()] = true
		if prev, dup := hosts[s.Hostname]; dup {
			fail("service %s: hostname %s is also %s's", s.Key(), s.Hostname, prev)
		}
		hosts[s.Hostname] = s.Key()
		if s.Address != "" {
			if _, err := netip.ParseAddr(s.Address); err != nil {
				fail("service %s: address %q: %v", s.Key(), s.Address, err)
			}
		}
		if len(s.Ports) == 0 {
			fail("service %s has no ports", s.Key())
		}
		seen := map[uint32]bool{}
		names := map[string]bool{}
		for _, p := range s.Ports {
			if p.Port == 0 || p.Port > 65535 || p.Target() > 65535 {
				fail("service %s: port %d is out of range", s.Key(), p.Port)
			}
			if seen[p.Port] || (p.Name != "" && names[p.Name]) {
				fail("service %s: port %d (%s) is declared twice", s.Key(), p.Port, p.Name)
			}
			seen[p.Port], names[p.Name] = true, true
			switch p.Protocol {
			case HTTP, HTTP2, GRPC, TCP:
			default:
				fail("service %s: port %d: protocol %q is not HTTP, HTTP2, GRPC or TCP", s.Key(), p.Port, p.Protocol)
			}
		}
		for i, e := range s.Endpoints {
			if _, err := netip.ParseAddr(e.Address); err != nil {
				fail("service %s: endpoint %d: address %q: %v", s.Key(), i, e.Address, err)
			}
			for n, t := range e.Ports {
				if !names[n] || t == 0 || t > 65535 {
					fail("service %s: endpoint %d: port %q=%d names no port of the service or is out of range", s.Key(), i, n, t)
				}
			}
			w := e.Workload
			if w == nil {
				fail("service %s: endpoint %d has no workload", s.Key(), i)
				continue
			}
			want, err := spiffeid.FromSegments(td, "ns", w.Namespace, "sa", w.ServiceAccount)
			switch {
			case w.Namespace != s.Namespace:
				fail("service %s: endpoint %d: workload %s is in another namespace", s.Key(), i, w.Key())
			case w.Name == "" || w.ServiceAccount == "":
				fail("service %s: endpoint %d: the workload needs a name and a service account", s.Key(), i)
			case err != nil:
				fail("service %s: endpoint %d: workload %s: %v", s.Key(), i, w.Key(), err)
			case w.ID != want:
				fail("service %s: endpoint %d: workload %s has SPIFFE ID %q, want %s", s.Key(), i, w.Key(), w.ID, want)
			}
			if prev, ok := workloads[w.key()]; ok && !sameWorkload(prev, w) {
				fail("workload %s is declared twice with different identities, labels, nodes, addresses or dataplane modes", w.Key())
			}
			workloads[w.key()] = w
		}
	}
	for i, w := range m.Workloads {
		want, err := spiffeid.FromSegments(td, "ns", w.Namespace, "sa", w.ServiceAccount)
		switch {
		case w.Namespace == "" || w.Name == "" || w.ServiceAccount == "":
			fail("workload %d (%s): namespace, name and service account are required", i, w.Key())
			continue
		case err != nil:
			fail("workload %s: %v", w.Key(), err)
		case w.ID != want:
			fail("workload %s has SPIFFE ID %q, want %s", w.Key(), w.ID, want)
		}
		if prev, ok := workloads[w.key()]; ok && prev != w && !sameWorkload(prev, w) {
			fail("workload %s is declared twice with different identities, labels, nodes, addresses or dataplane modes", w.Key())
		}
		workloads[w.key()] = w
	}
	errs = append(errs, validateDataPlane(m.AllWorkloads())...)
	for _, x := range m.External {
		if x.Host == "" || strings.ContainsAny(x.Host, "*/ ") {
			fail("external service %s/%s: host %q must be a plain DNS name", x.Namespace, x.Name, x.Host)
		}
		if _, dup := hosts[x.Host]; dup {
			fail("external service %s/%s: host %s is also a mesh service", x.Namespace, x.Name, x.Host)
		}
		hosts[x.Host] = x.Namespace + "/" + x.Name
		if len(x.Ports) == 0 {
			fail("external service %s/%s has no ports", x.Namespace, x.Name)
		}
		for _, p := range x.Ports {
			if p.Port == 0 || p.Port > 65535 || p.Target() > 65535 {
				fail("external service %s/%s: port %d is out of range", x.Namespace, x.Name, p.Port)
			}
			if !p.Protocol.IsHTTP() {
				fail("external service %s/%s: port %d: protocol %q: the egress gateway originates TLS for HTTP ports only", x.Namespace, x.Name, p.Port, p.Protocol)
			}
		}
	}
	egress := 0
	gateways := map[string]bool{}
	for _, g := range m.Gateways {
		if gateways[g.Key()] {
			fail("gateway %s is declared twice", g.Key())
		}
		gateways[g.Key()] = true
		if len(g.Selector) == 0 {
			fail("gateway %s needs a selector", g.Key())
		}
		switch g.Kind {
		case Ingress:
			for i, sv := range g.Servers {
				if sv.Port == 0 || sv.Port > 65535 || len(sv.Hosts) == 0 || sv.CredentialName == "" {
					fail("gateway %s: server %d needs a port, hosts and a credential name", g.Key(), i)
				}
				for _, r := range sv.Routes {
					s := m.Service(r.Service)
					if s == nil || !slices.ContainsFunc(s.Ports, func(p Port) bool { return p.Port == r.Port && p.Protocol.IsHTTP() }) {
						fail("gateway %s: server %d: route to %s:%d names no HTTP port of a mesh service", g.Key(), i, r.Service, r.Port)
					}
				}
			}
		case Egress:
			egress++
			s := m.Service(g.Namespace + "/" + g.Service)
			if s == nil || !slices.ContainsFunc(s.Ports, func(p Port) bool { return p.Port == g.Port && p.Protocol.IsHTTP() }) {
				fail("gateway %s: egress service %s port %d names no HTTP port of a mesh service in its namespace", g.Key(), g.Service, g.Port)
			}
		default:
			fail("gateway %s: kind %q is not ingress or egress", g.Key(), g.Kind)
		}
	}
	if egress > 1 {
		fail("%d egress gateways: at most one is supported", egress)
	}
	errs = append(errs, m.validateNodes(td)...)
	secrets := map[string]bool{}
	for _, s := range m.Secrets {
		if secrets[s.Key()] {
			fail("secret %s is declared twice", s.Key())
		}
		secrets[s.Key()] = true
		if len(s.CertPEM) == 0 || len(s.KeyPEM) == 0 {
			fail("secret %s needs a certificate and a key", s.Key())
		}
	}
	return errors.Join(errs...)
}

// ValidateNodes checks the Nodes against a trust domain (Validate does too):
// names are DNS-1123 subdomains declared once, and every workload has an
// identity of the trust domain that does not name a node, and selectors of
// known types, at least one, with a uid or gid beside a path or sha256 (an
// executable alone does not tell local users apart). It reports every
// problem.
func (m *Mesh) ValidateNodes(td spiffeid.TrustDomain) error {
	return errors.Join(m.validateNodes(td)...)
}

func (m *Mesh) validateNodes(td spiffeid.TrustDomain) []error {
	var errs []error
	fail := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...))
	}
	nodes := map[string]bool{}
	for i, n := range m.Nodes {
		if errs := validation.IsDNS1123Subdomain(n.Name); len(errs) > 0 {
			fail("node %d: name %q: %s", i, n.Name, strings.Join(errs, "; "))
			continue
		}
		if nodes[n.Name] {
			fail("node %s is declared twice", n.Name)
		}
		nodes[n.Name] = true
		if len(n.Workloads) == 0 {
			fail("node %s lists no workloads", n.Name)
		}
		for j, w := range n.Workloads {
			switch {
			case w.ID.IsZero():
				fail("node %s: workload %d: a SPIFFE ID is required", n.Name, j)
			case w.ID.TrustDomain() != td:
				fail("node %s: workload %d: %s is not in trust domain %s", n.Name, j, w.ID, td)
			case w.ID.Path() == "" || w.ID.Path() == "/node" || strings.HasPrefix(w.ID.Path(), "/node/"):
				fail("node %s: workload %d: %s is not a workload identity (spiffe://%s/node/... names nodes)", n.Name, j, w.ID, td)
			}
			if len(w.Selectors) == 0 {
				fail("node %s: workload %s: at least one selector is required, else every local process would receive it", n.Name, w.ID)
			}
			exe, user := false, false
			for _, sel := range w.Selectors {
				if err := ValidateSelector(sel); err != nil {
					fail("node %s: workload %s: %v", n.Name, w.ID, err)
				}
				switch {
				case strings.HasPrefix(sel, SelectorPath), strings.HasPrefix(sel, SelectorSHA256):
					exe = true
				case strings.HasPrefix(sel, SelectorUID), strings.HasPrefix(sel, SelectorGID):
					user = true
				}
			}
			if exe && !user {
				fail("node %s: workload %s: a path or sha256 selector needs a uid or gid beside it: "+
					"any local user can run a program, or bind one of theirs over a path in a mount namespace of their own", n.Name, w.ID)
			}
		}
	}
	return errs
}

// validateDataPlane checks what the node proxy reads of each workload:
// addresses that parse and no two workloads sharing one, a known dataplane
// mode, and off Kubernetes (no pod UID) a node and a network namespace for
// an ambient workload; a netns is given only to ambient workloads.
func validateDataPlane(ws []*Workload) []error {
	var errs []error
	fail := func(format string, args ...any) {
		errs = append(errs, fmt.Errorf("%w: "+format, append([]any{ErrInvalid}, args...)...))
	}
	owner := map[netip.Addr]*Workload{}
	for _, w := range ws {
		for _, a := range w.Addresses {
			ip, err := netip.ParseAddr(a)
			switch {
			case err != nil:
				fail("workload %s: address %q: %v", w.Key(), a, err)
				continue
			case ip.Zone() != "" || ip.IsUnspecified() || ip.IsMulticast():
				fail("workload %s: address %s is not a unicast address without a zone", w.Key(), a)
				continue
			}
			ip = ip.Unmap()
			if prev, dup := owner[ip]; dup && prev.key() != w.key() {
				fail("workload %s: address %s is also workload %s's", w.Key(), ip, prev.Key())
			}
			owner[ip] = w
		}
		if w.DataPlaneMode != "" {
			if _, err := ParseDataPlaneMode(string(w.DataPlaneMode)); err != nil {
				fail("workload %s: dataplane mode %v", w.Key(), err)
			}
		}
		if w.Node != "" {
			if msgs := validation.IsDNS1123Subdomain(w.Node); len(msgs) > 0 {
				fail("workload %s: node %q: %s", w.Key(), w.Node, strings.Join(msgs, "; "))
			}
		}
		if w.Netns != "" {
			if w.Mode() != DataPlaneAmbient {
				fail("workload %s: netns %q is for ambient workloads, which the node proxy captures; this one is %s", w.Key(), w.Netns, w.Mode())
			} else if err := ValidateSelector(SelectorNetns + w.Netns); err != nil {
				fail("workload %s: netns: %v", w.Key(), err)
			}
		}
		// On Kubernetes (a pod UID) a pod not scheduled yet has no node,
		// and the node proxy finds its namespace itself.
		if w.Mode() == DataPlaneAmbient && w.UID == "" {
			if w.Node == "" {
				fail("workload %s is ambient but names no node: no node proxy would capture it", w.Key())
			}
			if w.Netns == "" {
				fail("workload %s is ambient but names no netns: off Kubernetes the node proxy captures it in that network namespace", w.Key())
			}
		}
	}
	return errs
}

// sameWorkload reports whether two declarations of one workload agree.
func sameWorkload(a, b *Workload) bool {
	return a.ID == b.ID && equalLabels(a.Labels, b.Labels) && a.Node == b.Node && a.Mode() == b.Mode() &&
		a.Netns == b.Netns && slices.Equal(a.Addresses, b.Addresses)
}

// EgressGateway returns the egress gateway, or nil.
func (m *Mesh) EgressGateway() *Gateway {
	for _, g := range m.Gateways {
		if g.Kind == Egress {
			return g
		}
	}
	return nil
}

func equalLabels(a, b map[string]string) bool {
	if len(a) != len(b) {
		return false
	}
	for k, v := range a {
		if bv, ok := b[k]; !ok || bv != v {
			return false
		}
	}
	return true
}

// Sort orders every list by key, so that generated config is stable.
func (m *Mesh) Sort() {
	sort.Slice(m.Services, func(i, j int) bool { return m.Services[i].Key() < m.Services[j].Key() })
	for _, s := range m.Services {
		sort.Slice(s.Ports, func(i, j int) bool { return s.Ports[i].Port < s.Ports[j].Port })
		sort.SliceStable(s.Endpoints, func(i, j int) bool {
			a, b := s.Endpoints[i], s.Endpoints[j]
			if a.Address != b.Address {
				return a.Address < b.Address
			}
			return a.Workload.Key() < b.Workload.Key()
		})
	}
	sort.Slice(m.Workloads, func(i, j int) bool { return m.Workloads[i].Key() < m.Workloads[j].Key() })
	sort.Slice(m.External, func(i, j int) bool { return m.External[i].Host < m.External[j].Host })
	sort.Slice(m.Gateways, func(i, j int) bool { return m.Gateways[i].Key() < m.Gateways[j].Key() })
	sort.Slice(m.Secrets, func(i, j int) bool { return m.Secrets[i].Key() < m.Secrets[j].Key() })
	sort.Slice(m.Nodes, func(i, j int) bool { return m.Nodes[i].Name < m.Nodes[j].Name })
}

// ValidateSelector checks one node selector: a known type and a value of
// its form (a decimal id, an absolute clean path, 64 lower-case hex digits,
// a network namespace name or absolute path, a pod UID).
func ValidateSelector(sel string) error {
	bad := func(why string) error { return fmt.Errorf("selector %q: %s", sel, why) }
	switch {
	case strings.HasPrefix(sel, SelectorUID), strings.HasPrefix(sel, SelectorGID):
		v := sel[strings.LastIndexByte(sel, ':')+1:]
		if n, err := strconv.ParseUint(v, 10, 32); err != nil || v != strconv.FormatUint(n, 10) {
			return bad("want a decimal id from 0 to 4294967295")
		}
	case strings.HasPrefix(sel, SelectorPath):
		v := strings.TrimPrefix(sel, SelectorPath)
		if !path.IsAbs(v) || path.Clean(v) != v || strings.ContainsRune(v, 0) {
			return bad("want an absolute, clean path")
		}
	case strings.HasPrefix(sel, SelectorSHA256):
		v := strings.TrimPrefix(sel, SelectorSHA256)
		if len(v) != 64 || strings.Trim(v, "0123456789abcdef") != "" {
			return bad("want 64 lower-case hex digits")
		}
	case strings.HasPrefix(sel, SelectorNetns):
		v := strings.TrimPrefix(sel, SelectorNetns)
		switch {
		case v == "" || strings.ContainsRune(v, 0):
			return bad("want a namespace name under /run/netns or an absolute path")
		case strings.HasPrefix(v, "/"):
			if path.Clean(v) != v {
				return bad("want an absolute, clean path")
			}
		case strings.Contains(v, "/") || v == "." || v == "..":
			return bad("a namespace name has no slash")
		}
	case strings.HasPrefix(sel, SelectorPodUID):
		if strings.TrimPrefix(sel, SelectorPodUID) == "" {
			return bad("want a pod UID")
		}
	default:
		return bad("unknown type")
	}
	return nil
}
