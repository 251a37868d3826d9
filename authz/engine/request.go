package engine

import (
	"errors"
	"net/netip"
	"strings"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"

	"github.com/trustmesh/trustmesh/authz/pathnorm"
)

// ExternalAddressHeader carries the original client address that Envoy
// computes from X-Forwarded-For with xff_num_trusted_hops; it is remote.ip.
// Without it, remote.ip is the direct peer address.
const ExternalAddressHeader = "x-envoy-external-address"

// Identity is a SPIFFE ID split into the parts policies match.
type Identity struct {
	// Principal is the SPIFFE ID without "spiffe://".
	Principal      string
	TrustDomain    string
	Namespace      string // only for .../ns/<ns>/sa/<sa> IDs
	ServiceAccount string
}

// ParseIdentity parses a SPIFFE ID. ok is false for anything else.
func ParseIdentity(id string) (Identity, bool) {
	rest, found := strings.CutPrefix(id, "spiffe://")
	if !found || rest == "" {
		return Identity{}, false
	}
	parts := strings.Split(rest, "/")
	if parts[0] == "" {
		return Identity{}, false
	}
	for _, p := range parts[1:] {
		if p == "" {
			return Identity{}, false
		}
	}
	out := Identity{Principal: rest, TrustDomain: parts[0]}
	if len(parts) == 5 && parts[1] == "ns" && parts[3] == "sa" {
		out.Namespace, out.ServiceAccount = parts[2], parts[4]
	}
	return out, true
}

// Workload is the destination of a check.
type Workload struct {
	Namespace string
	Labels    map[string]string
}

// request is what the generated Rego matches, taken from a CheckRequest.
type request struct {
	http        bool
	source      Identity
	hasSource   bool
	dest        Workload
	sourceIP    string
	remoteIP    string
	destIP      string
	destPort    uint32
	hasPort     bool
	sni         string
	host        string
	method      string
	rawPath     string
	path        string // normalized
	pathErr     error  // wraps pathnorm.ErrRejected
	headers     map[string]string
	destPrincip string
}

var errNoDestination = errors.New("destination workload unknown: attributes.destination.principal is not a SPIFFE ID with a namespace")

func newRequest(req *authv3.CheckRequest) (*request, error) {
	a := req.GetAttributes()
	r := &request{destPrincip: a.GetDestination().GetPrincipal()}
	dest, ok := ParseIdentity(r.destPrincip)
	if !ok || dest.Namespace == "" {
		return r, errNoDestination
	}
	r.dest = Workload{Namespace: dest.Namespace, Labels: a.GetDestination().GetLabels()}
	if id, ok := ParseIdentity(a.GetSource().GetPrincipal()); ok {
		r.source, r.hasSource = id, true
	}
	r.sourceIP = addrIP(a.GetSource().GetAddress())
	r.remoteIP = r.sourceIP
	r.destIP = addrIP(a.GetDestination().GetAddress())
	if sa := a.GetDestination().GetAddress().GetSocketAddress(); sa != nil {
		if p, ok := sa.GetPortSpecifier().(*corev3.SocketAddress_PortValue); ok {
			r.destPort, r.hasPort = p.PortValue, true
		}
	}
	r.sni = a.GetTlsSession().GetSni()
	h := a.GetRequest().GetHttp()
	if h == nil {
		return r, nil
	}
	r.http = true
	r.host = strings.ToLower(h.GetHost())
	r.method = h.GetMethod()
	r.rawPath = h.GetPath()
	r.headers = make(map[string]string, len(h.GetHeaders()))
	for k, v := range h.GetHeaders() {
		r.headers[strings.ToLower(k)] = v
	}
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		k := strings.ToLower(hv.GetKey())
		v := hv.GetValue()
		if v == "" && len(hv.GetRawValue()) > 0 {
			v = string(hv.GetRawValue())
		}
		if prev, ok := r.headers[k]; ok {
			v = prev + "," + v
		}
		r.headers[k] = v
	}
	if ext, ok := r.headers[ExternalAddressHeader]; ok {
		if ip, err := netip.ParseAddr(strings.TrimSpace(ext)); err == nil {
			r.remoteIP = ip.Unmap().String()
		}
	}
	r.path, r.pathErr = pathnorm.Normalize(r.rawPath)
	return r, nil
}

func addrIP(a *corev3.Address) string {
	ip, err := netip.ParseAddr(a.GetSocketAddress().GetAddress())
	if err != nil {
		return ""
	}
	return ip.Unmap().String()
}

func str(s string) *ast.Term { return ast.StringTerm(s) }

// input builds the Rego input of the generated modules (documented in
// authz/rego) for the listed policy ids.
func (r *request) input(ids []*ast.Term) ast.Value {
	proto := "tcp"
	if r.http {
		proto = "http"
	}
	src := ast.NewObject()
	if r.hasSource {
		src.Insert(str("principal"), str(r.source.Principal))
		src.Insert(str("td"), str(r.source.TrustDomain))
		if r.source.Namespace != "" {
			src.Insert(str("namespace"), str(r.source.Namespace))
			src.Insert(str("sa"), str(r.source.Namespace+"/"+r.source.ServiceAccount))
		}
	}
	if r.sourceIP != "" {
		src.Insert(str("ip"), str(r.sourceIP))
	}
	obj := ast.NewObject(
		ast.Item(str("proto"), str(proto)),
		ast.Item(str("policies"), ast.ArrayTerm(ids...)),
		ast.Item(str("source"), ast.NewTerm(src)),
	)
	if r.remoteIP != "" {
		obj.Insert(str("remote"), ast.ObjectTerm(ast.Item(str("ip"), str(r.remoteIP))))
	}
	dst := ast.NewObject()
	if r.destIP != "" {
		dst.Insert(str("ip"), str(r.destIP))
	}
	if r.hasPort {
		dst.Insert(str("port"), ast.IntNumberTerm(int(r.destPort)))
	}
	obj.Insert(str("destination"), ast.NewTerm(dst))
	if r.sni != "" {
		obj.Insert(str("sni"), str(r.sni))
	}
	if r.http {
		hdrs := ast.NewObject()
		for k, v := range r.headers {
			hdrs.Insert(str(k), str(v))
		}
		obj.Insert(str("http"), ast.ObjectTerm(
			ast.Item(str("host"), str(r.host)),
			ast.Item(str("method"), str(r.method)),
			ast.Item(str("path"), str(r.path)),
			ast.Item(str("headers"), ast.NewTerm(hdrs)),
		))
	}
	return obj
}
