package engine

import (
	"errors"
	"fmt"
	"net/netip"
	"sort"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/pathnorm"
	"github.com/trustmesh/trustmesh/authz/policy"
	authzrego "github.com/trustmesh/trustmesh/authz/rego"
)

// ExternalAddressHeader carries the original client address that Envoy
// computes from X-Forwarded-For with xff_num_trusted_hops, on a listener
// with use_remote_address. Any client can send it too, so RemoteIP decides
// when it counts.
const ExternalAddressHeader = "x-envoy-external-address"

// Gateways tells which SPIFFE IDs are the mesh's gateways (ingress and
// egress). The caller injects it; it may be a live view of the mesh.
type Gateways interface {
	// IsGateway reports whether id ("spiffe://...") is the identity of a
	// gateway workload, and of no other workload.
	IsGateway(id string) bool
}

// GatewayIDs is a fixed set of gateway SPIFFE IDs.
type GatewayIDs map[string]bool

// IsGateway reports whether id is in the set.
func (g GatewayIDs) IsGateway(id string) bool { return g[id] }

// NewGatewayIDs returns the set of the given SPIFFE IDs.
func NewGatewayIDs(ids ...string) GatewayIDs {
	g := make(GatewayIDs, len(ids))
	for _, id := range ids {
		g[id] = true
	}
	return g
}

// RemoteIP is remote.ip as ext_authz decides it from the CheckRequest
// alone, since any Envoy may call ext_authz:
//
//   - the destination is a gateway (its principal is a gateway identity):
//     the external address, which a gateway's Envoy overwrites on every
//     request (use_remote_address: true), else the direct peer;
//   - the destination is a sidecar: the external address only when the
//     direct peer is a gateway identity, which set it; otherwise the
//     direct peer, whatever header the client sent.
//
// peer is the direct peer's address (attributes.source.address) and ext
// the x-envoy-external-address header, if any; either may be empty.
func RemoteIP(g Gateways, destPrincipal, sourcePrincipal, peer, ext string) string {
	trusted := g.IsGateway(destPrincipal) || sourcePrincipal != "" && g.IsGateway(sourcePrincipal)
	if !trusted || ext == "" {
		return peer
	}
	ip, err := netip.ParseAddr(strings.TrimSpace(ext))
	if err != nil {
		return peer
	}
	return ip.Unmap().String()
}

// remoteAddr is RemoteIP on parsed addresses, without allocating: peer is
// the direct peer's address (invalid when unknown) and the result is
// invalid when remote.ip is absent.
func remoteAddr(g Gateways, destPrincipal, sourcePrincipal string, peer netip.Addr, ext string, hasExt bool) netip.Addr {
	trusted := g.IsGateway(destPrincipal) || sourcePrincipal != "" && g.IsGateway(sourcePrincipal)
	if !trusted || !hasExt || ext == "" {
		return peer
	}
	ip, err := netip.ParseAddr(strings.TrimSpace(ext))
	if err != nil {
		return peer
	}
	return ip.Unmap()
}

// Identity is a SPIFFE ID split into the parts policies match.
type Identity struct {
	// Principal is the SPIFFE ID without "spiffe://".
	Principal      string
	TrustDomain    string
	Namespace      string // only for .../ns/<ns>/sa/<sa> IDs
	ServiceAccount string
}

// ParseIdentity parses a SPIFFE ID. ok is false for anything that is not
// a well-formed SPIFFE ID as go-spiffe's spiffeid.FromString reads one: the
// scheme in lower case; a trust domain of lower-case letters, digits, dots,
// dashes and underscores; path segments of letters, digits, dots, dashes
// and underscores, none empty, "." or ".."; no query, fragment, port,
// user, percent-encoding, whitespace or control character. The alphabet is
// checked here too, so that go-spiffe's spiffeid_charset_backcompat build
// tag cannot widen it.
//
// Policies match a peer both on the parts parsed here (ALLOW namespaces)
// and with Istio's regexps on the whole ID (DENY namespaces and
// serviceAccounts), whose "." does not match a newline. Only on IDs of this
// alphabet do the two readings agree, so any other peer ID must never
// reach evaluation (see ReasonPeerRejected).
//
// The parts are substrings of id: parsing allocates nothing.
func ParseIdentity(id string) (Identity, bool) {
	if _, err := spiffeid.FromString(id); err != nil {
		return Identity{}, false
	}
	rest := strings.TrimPrefix(id, "spiffe://")
	for i := 0; i < len(rest); i++ {
		switch c := rest[i]; {
		case c >= 'a' && c <= 'z', c >= 'A' && c <= 'Z', c >= '0' && c <= '9', c == '-', c == '.', c == '_', c == '/':
		default:
			return Identity{}, false
		}
	}
	td, path, _ := strings.Cut(rest, "/")
	out := Identity{Principal: rest, TrustDomain: td}
	// Exactly td/ns/<ns>/sa/<sa>.
	if ns, rest, ok := strings.Cut(path, "/"); ok && ns == "ns" {
		if nsName, rest, ok := strings.Cut(rest, "/"); ok {
			if sa, saName, ok := strings.Cut(rest, "/"); ok && sa == "sa" && !strings.Contains(saName, "/") {
				out.Namespace, out.ServiceAccount = nsName, saName
			}
		}
	}
	return out, true
}

// Workload is the destination of a check.
type Workload struct {
	Namespace string
	Labels    map[string]string
}

// request is what policies match, taken from a CheckRequest. Building it
// allocates nothing on the common path: addresses stay parsed, headers
// are looked up in the proto's map when a policy asks for one, and the
// path is normalized when a policy first reads it (or rejected at once
// when normalization could reject it).
type request struct {
	http      bool
	source    Identity
	hasSource bool
	// srcPrincipal is the source principal as sent ("spiffe://..."),
	// when hasSource.
	srcPrincipal string
	dest         Workload
	sourceAddr   netip.Addr // invalid when absent
	destAddr     netip.Addr
	// remote is remote.ip once remoteDone (see remoteAddr); gw decides it.
	remote     netip.Addr
	remoteDone bool
	gw         Gateways
	destPort   uint32
	hasPort    bool
	sni        string
	host       string
	hostNorm   string // host without a :port and one trailing dot
	method     string
	rawPath    string
	// path is the normalized path once normalized is set (see
	// normalize); evalProvider may read it after normalize.
	path       string
	normalized bool
	pathErr    error // wraps pathnorm.ErrRejected
	peerErr    error // wraps ErrPeerRejected
	hdrs       map[string]string
	hdrMap     []*corev3.HeaderValue
	// hdrSlow (once hdrChecked): mixed-case names or a header_map, so that
	// lookups join values.
	hdrSlow     bool
	hdrChecked  bool
	destPrincip string
}

// ErrPeerRejected is the error of a check whose source principal is not a
// well-formed SPIFFE ID (ParseIdentity); such a check is denied.
var ErrPeerRejected = errors.New("source principal is not a well-formed SPIFFE ID")

// HBONEDestinationExtension is the ext_authz context extension with which
// a sidecar's HBONE chain (xds/proxyconfig) asks about a CONNECT it
// terminates: the route's one local destination "IP:port". Only Envoy's
// configuration sets context extensions, never a client.
const HBONEDestinationExtension = "trustmesh.io/hbone-destination"

var errHBONE = errors.New("an HBONE check must be a CONNECT to an IP:port destination")

var errNoDestination = errors.New("destination workload unknown: attributes.destination.principal is not a SPIFFE ID with a namespace")

func newRequest(req *authv3.CheckRequest, gw Gateways) (*request, error) {
	r := &request{}
	err := r.init(req, gw)
	r.normalize()
	return r, err
}

// init fills r (which must be zero) from req.
func (r *request) init(req *authv3.CheckRequest, gw Gateways) error {
	a := req.GetAttributes()
	r.destPrincip = a.GetDestination().GetPrincipal()
	dest, ok := ParseIdentity(r.destPrincip)
	if !ok || dest.Namespace == "" {
		return errNoDestination
	}
	r.dest = Workload{Namespace: dest.Namespace, Labels: a.GetDestination().GetLabels()}
	if p := a.GetSource().GetPrincipal(); p != "" {
		id, ok := ParseIdentity(p)
		if !ok {
			// Quoted, so that no control character reaches a log as is.
			r.peerErr = fmt.Errorf("%w: %q", ErrPeerRejected, p)
		} else {
			r.srcPrincipal = p
		}
		r.source, r.hasSource = id, ok
	}
	r.sourceAddr = addrOf(a.GetSource().GetAddress())
	r.destAddr = addrOf(a.GetDestination().GetAddress())
	if sa := a.GetDestination().GetAddress().GetSocketAddress(); sa != nil {
		if p, ok := sa.GetPortSpecifier().(*corev3.SocketAddress_PortValue); ok {
			r.destPort, r.hasPort = p.PortValue, true
		}
	}
	r.sni = a.GetTlsSession().GetSni()
	if dest, ok := a.GetContextExtensions()[HBONEDestinationExtension]; ok {
		// A sidecar terminating an HBONE tunnel: the CONNECT's route names
		// the one local destination it forwards to, and the check is of a
		// TCP connection to it, as the node proxy's checks are.
		ap, err := netip.ParseAddrPort(dest)
		if err != nil || a.GetRequest().GetHttp().GetMethod() != "CONNECT" {
			return fmt.Errorf("%w: destination %q, method %q", errHBONE, dest, a.GetRequest().GetHttp().GetMethod())
		}
		r.destAddr = ap.Addr().Unmap()
		r.destPort, r.hasPort = uint32(ap.Port()), true
		r.remote, r.remoteDone = r.sourceAddr, true
		return nil
	}
	h := a.GetRequest().GetHttp()
	if h == nil {
		r.remote, r.remoteDone = r.sourceAddr, true
		return nil
	}
	r.http = true
	r.host = strings.ToLower(h.GetHost())
	r.hostNorm = NormalizeHost(r.host)
	r.method = h.GetMethod()
	r.rawPath = h.GetPath()
	r.hdrs = h.GetHeaders()
	r.hdrMap = h.GetHeaderMap().GetHeaders()
	r.gw = gw
	if mayReject(r.rawPath) {
		r.normalize()
	}
	return nil
}

// mayReject reports whether pathnorm.Normalize could reject raw: only a
// path that does not start with '/' or that holds a '%', a backslash or a
// NUL byte can be. Any other is normalized when a policy first reads it.
func mayReject(raw string) bool {
	p, _ := pathnorm.Split(raw)
	return p == "" || p[0] != '/' || strings.IndexByte(p, '%') >= 0 || strings.IndexByte(p, '\\') >= 0 || strings.IndexByte(p, 0) >= 0
}

// normalize normalizes the path of an HTTP request, once.
func (r *request) normalize() {
	if !r.http || r.normalized {
		return
	}
	r.path, r.pathErr = pathnorm.Normalize(r.rawPath)
	r.normalized = true
}

// normPath is the normalized path of an HTTP request.
func (r *request) normPath() string {
	r.normalize()
	return r.path
}

// remoteAddr is remote.ip (see RemoteIP), worked out when first asked
// for; it is invalid when absent.
func (r *request) remoteAddr() netip.Addr {
	if !r.remoteDone {
		ext, hasExt := r.header(ExternalAddressHeader)
		r.remote = remoteAddr(r.gw, r.destPrincip, r.srcPrincipal, r.sourceAddr, ext, hasExt)
		r.remoteDone = true
	}
	return r.remote
}

// isLower reports whether strings.ToLower(s) == s, allocating only for
// non-ASCII names.
func isLower(s string) bool {
	for i := 0; i < len(s); i++ {
		c := s[i]
		if c >= 0x80 {
			return strings.ToLower(s) == s
		}
		if 'A' <= c && c <= 'Z' {
			return false
		}
	}
	return true
}

// header returns the value of the lower-cased header name. Envoy sends
// lower-case names; should a request carry one name in several cases, or
// in header_map, the values are joined (as Envoy joins repeated headers)
// in a fixed order, so the result never depends on map order: the
// lower-case name's, the others' in sorted order of their names, then
// header_map's in order.
func (r *request) header(name string) (string, bool) {
	if !r.http || !isLower(name) {
		return "", false
	}
	v, ok := r.hdrs[name]
	if !r.hdrChecked {
		r.hdrSlow = len(r.hdrMap) > 0
		for k := range r.hdrs {
			if r.hdrSlow {
				break
			}
			r.hdrSlow = !isLower(k)
		}
		r.hdrChecked = true
	}
	if !r.hdrSlow {
		return v, ok
	}
	var mixed []string
	for k := range r.hdrs {
		if k != name && strings.ToLower(k) == name {
			mixed = append(mixed, k)
		}
	}
	sort.Strings(mixed)
	for _, k := range mixed {
		if ok {
			v += "," + r.hdrs[k]
		} else {
			v, ok = r.hdrs[k], true
		}
	}
	for _, hv := range r.hdrMap {
		if strings.ToLower(hv.GetKey()) != name {
			continue
		}
		x := hv.GetValue()
		if x == "" && len(hv.GetRawValue()) > 0 {
			x = string(hv.GetRawValue())
		}
		if ok {
			v += "," + x
		} else {
			v, ok = x, true
		}
	}
	return v, ok
}

// NormalizeHost strips a :port (digits, possibly none) from host, also
// after an IPv6 literal ("[::1]:8080" becomes "[::1]"), then one trailing
// dot, as Envoy's strip_any_host_port and strip_trailing_host_dot do.
func NormalizeHost(host string) string {
	if i := strings.LastIndexByte(host, ':'); i >= 0 && digits(host[i+1:]) {
		// A colon before the last one is part of an IPv6 literal, unless
		// the literal is bracketed and closed right before the port.
		if !strings.Contains(host[:i], ":") || strings.HasPrefix(host, "[") && strings.HasSuffix(host[:i], "]") {
			host = host[:i]
		}
	}
	return strings.TrimSuffix(host, ".")
}

func digits(s string) bool {
	for i := 0; i < len(s); i++ {
		if s[i] < '0' || s[i] > '9' {
			return false
		}
	}
	return true
}

// addrOf parses an address's IP, unmapped; it is invalid when absent or
// malformed.
func addrOf(a *corev3.Address) netip.Addr {
	ip, err := netip.ParseAddr(a.GetSocketAddress().GetAddress())
	if err != nil {
		return netip.Addr{}
	}
	return ip.Unmap()
}

// addrString is an address as the Rego input and explanations show it:
// empty when absent.
func addrString(a netip.Addr) string {
	if !a.IsValid() {
		return ""
	}
	return a.String()
}

func str(s string) *ast.Term { return ast.StringTerm(s) }

// The keys of the input object (documented in authz/rego), allocated once.
var (
	kProto     = str("proto")
	kPolicies  = str("policies")
	kPrincipal = str(policy.SourcePrincipal.String())
	kTD        = str(policy.SourceTrustDomain.String())
	kNamespace = str(policy.SourceNamespace.String())
	kSA        = str(policy.SourceServiceAccount.String())
	kSourceIP  = str(policy.SourceIP.String())
	kRemoteIP  = str(policy.RemoteIP.String())
	kDestIP    = str(policy.DestinationIP.String())
	kDestPort  = str(policy.DestinationPort.String())
	kSNI       = str(policy.SNI.String())
	kHost      = str(policy.Host.String())
	kHostNorm  = str(authzrego.NormalizedHostKey)
	kMethod    = str(policy.Method.String())
	kPath      = str(policy.Path.String())
	vHTTP      = str("http")
	vTCP       = str("tcp")
)

// attrSet is a set of attributes.
type attrSet uint32

func (s attrSet) with(a policy.Attribute) attrSet { return s | 1<<a }
func (s attrSet) has(a policy.Attribute) bool     { return s&(1<<a) != 0 }

// headerKey is the input key of a header.
type headerKey struct {
	name string
	key  *ast.Term
}

// input builds the flat Rego input of the generated modules for the listed
// policy ids. Only the headers some policy of the set matches on are
// included.
func (r *request) input(ids []*ast.Term, used attrSet, headers []headerKey) ast.Value {
	proto := vTCP
	if r.http {
		proto = vHTTP
	}
	items := make([][2]*ast.Term, 0, 16+len(headers))
	items = append(items, ast.Item(kProto, proto), ast.Item(kPolicies, ast.ArrayTerm(ids...)))
	add := func(a policy.Attribute, k *ast.Term, v string) {
		if v != "" && used.has(a) {
			items = append(items, ast.Item(k, str(v)))
		}
	}
	if r.hasSource {
		add(policy.SourcePrincipal, kPrincipal, r.source.Principal)
		add(policy.SourceTrustDomain, kTD, r.source.TrustDomain)
		if r.source.Namespace != "" {
			add(policy.SourceNamespace, kNamespace, r.source.Namespace)
			if used.has(policy.SourceServiceAccount) {
				add(policy.SourceServiceAccount, kSA, r.source.Namespace+"/"+r.source.ServiceAccount)
			}
		}
	}
	add(policy.SourceIP, kSourceIP, addrString(r.sourceAddr))
	add(policy.RemoteIP, kRemoteIP, addrString(r.remoteAddr()))
	add(policy.DestinationIP, kDestIP, addrString(r.destAddr))
	if r.hasPort && used.has(policy.DestinationPort) {
		items = append(items, ast.Item(kDestPort, ast.IntNumberTerm(int(r.destPort))))
	}
	add(policy.SNI, kSNI, r.sni)
	if r.http {
		// Host, method and path are there even when empty, as in the
		// request; only unused ones are left out.
		for _, x := range []struct {
			a policy.Attribute
			k *ast.Term
			v string
		}{{policy.Host, kHost, r.host}, {policy.Method, kMethod, r.method}, {policy.Path, kPath, r.normPath()}} {
			if used.has(x.a) {
				items = append(items, ast.Item(x.k, str(x.v)))
			}
		}
		if used.has(policy.Host) {
			items = append(items, ast.Item(kHostNorm, str(r.hostNorm)))
		}
		for _, h := range headers {
			if v, ok := r.header(h.name); ok {
				items = append(items, ast.Item(h.key, str(v)))
			}
		}
	}
	return ast.NewObject(items...)
}
