// Package casefile reads the YAML case files under authz/testdata/cases:
// AuthorizationPolicies (and Rego bundles) with requests and the decisions
// they must get. The engine runs them, and the RBAC back end is checked
// against them, so both back ends are held to one specification.
package casefile

import (
	"fmt"
	"os"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// Load reads one case file, refusing unknown fields.
func Load(path string) (*File, error) {
	raw, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("casefile: %w", err)
	}
	var f File
	if err := yaml.UnmarshalStrict(raw, &f); err != nil {
		return nil, fmt.Errorf("casefile: %s: %w", path, err)
	}
	return &f, nil
}

// File is one authz/testdata/cases/*.yaml file: policies (and bundles)
// shared by its cases, and requests with their expected decisions.
type File struct {
	RootNamespace string `json:"root_namespace"`
	// Gateways are the mesh's gateway SPIFFE IDs (engine.Gateways).
	Gateways []string          `json:"gateways"`
	Policies string            `json:"policies"`
	Bundles  map[string]Bundle `json:"bundles"`
	// LoadError, if set, is a substring of the error loading must give.
	LoadError string `json:"load_error"`
	Cases     []Case `json:"cases"`
}

type Bundle struct {
	Files  map[string]string `json:"files"`
	RegoV0 bool              `json:"rego_v0"`
}

type Case struct {
	Name    string  `json:"name"`
	Request Request `json:"request"`
	Want    Want    `json:"want"`
}

type Request struct {
	Source      *Peer  `json:"source"`
	Destination *Peer  `json:"destination"`
	SNI         string `json:"sni"`
	TCP         bool   `json:"tcp"`
	HTTP        HTTP   `json:"http"`
}

type Peer struct {
	Principal *string           `json:"principal"`
	IP        *string           `json:"ip"`
	Port      *uint32           `json:"port"`
	Labels    map[string]string `json:"labels"`
}

type HTTP struct {
	Method  string            `json:"method"`
	Host    string            `json:"host"`
	Path    string            `json:"path"`
	Headers map[string]string `json:"headers"`
	Body    string            `json:"body"`
}

type Want struct {
	Allowed bool              `json:"allowed"`
	Policy  *string           `json:"policy"` // "" means no policy decided
	Rule    *int              `json:"rule"`
	Reason  string            `json:"reason"`
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers"`
	Body    string            `json:"body"`
	Audit   []engine.Match    `json:"audit"`
	// DryRunAllowed is the shadow decision of dry-run policies.
	DryRunAllowed *bool `json:"dry_run_allowed"`
	Error         bool  `json:"error"`
}

// CheckRequest builds the request a case describes. Unset fields take
// defaults: a peer spiffe://cluster.local/ns/bar/sa/client at 10.0.0.1, a
// destination spiffe://cluster.local/ns/foo/sa/web (app=web) at
// 10.0.0.2:8080, and an HTTP GET of / on host web.foo.svc.
func (r Request) CheckRequest() *authv3.CheckRequest {
	src := Peer{Principal: ptr("spiffe://cluster.local/ns/bar/sa/client"), IP: ptr("10.0.0.1"), Port: ptr[uint32](43210)}
	if r.Source != nil {
		merge(&src, r.Source)
	}
	dst := Peer{Principal: ptr("spiffe://cluster.local/ns/foo/sa/web"), IP: ptr("10.0.0.2"), Port: ptr[uint32](8080), Labels: map[string]string{"app": "web"}}
	if r.Destination != nil {
		merge(&dst, r.Destination)
	}
	a := &authv3.AttributeContext{
		Source:      peer(src),
		Destination: peer(dst),
	}
	if r.SNI != "" {
		a.TlsSession = &authv3.AttributeContext_TLSSession{Sni: r.SNI}
	}
	if !r.TCP {
		h := r.HTTP
		if h.Method == "" {
			h.Method = "GET"
		}
		if h.Host == "" {
			h.Host = "web.foo.svc"
		}
		if h.Path == "" {
			h.Path = "/"
		}
		a.Request = &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: h.Method, Host: h.Host, Path: h.Path, Headers: h.Headers, Body: h.Body, Protocol: "HTTP/1.1",
		}}
	}
	return &authv3.CheckRequest{Attributes: a}
}

func merge(dst, src *Peer) {
	if src.Principal != nil {
		dst.Principal = src.Principal
	}
	if src.IP != nil {
		dst.IP = src.IP
	}
	if src.Port != nil {
		dst.Port = src.Port
	}
	if src.Labels != nil {
		dst.Labels = src.Labels
	}
}

func peer(p Peer) *authv3.AttributeContext_Peer {
	return &authv3.AttributeContext_Peer{
		Principal: *p.Principal,
		Labels:    p.Labels,
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: *p.IP, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: *p.Port},
		}}},
	}
}

func ptr[T any](v T) *T { return &v }
