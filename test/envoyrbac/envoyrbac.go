// Package envoyrbac evaluates Envoy RBAC configurations (envoy.config.rbac.v3)
// against a request, with Envoy's matcher semantics. It is the evaluator of
// the differential test against Istio's policy compiler: the oracle module
// (test/istio-oracle) runs it on the RBAC that Istio's builder generates, and
// the main module's conformance test runs it on what authz/rbac generates.
//
// It covers what both compilers emit: and/or/not, any, authenticated
// principal names, direct_remote_ip, remote_ip and source_ip, header matchers
// (string, present and invert), url_path, uri_template, destination_ip and
// destination_port, requested_server_name and metadata. Anything else is an
// error, never a silent non-match.
package envoyrbac

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"strings"
	"sync"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	uritemplatev3 "github.com/envoyproxy/go-control-plane/envoy/extensions/path/match/uri_template/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
)

// ErrUnsupported marks a matcher this evaluator does not implement.
var ErrUnsupported = errors.New("envoyrbac: matcher not supported")

// Request is what Envoy's RBAC filters see of one request or connection.
type Request struct {
	// HTTP is false for a TCP connection (the network RBAC filter), which
	// has no headers and no path.
	HTTP bool
	// Principal is the peer certificate's URI SAN, "" without mTLS.
	Principal string
	// DirectRemoteIP is the connection's peer address; RemoteIP is the
	// address Envoy derived for the downstream client (XFF handling).
	DirectRemoteIP netip.Addr
	RemoteIP       netip.Addr
	DestinationIP  netip.Addr
	DestPort       uint32
	// SNI is the requested server name, "" without one.
	SNI string
	// Headers are the request headers by lower-case name, including the
	// pseudo-headers :authority, :method and :path.
	Headers map[string]string
}

// Matched reports whether a policy of rules matches the request, and the
// names of the matching policies.
func Matched(rules *rbacv3.RBAC, r *Request) (bool, []string, error) {
	var names []string
	for name, p := range rules.GetPolicies() {
		ok, err := MatchPolicy(p, r)
		if err != nil {
			return false, nil, fmt.Errorf("policy %s: %w", name, err)
		}
		if ok {
			names = append(names, name)
		}
	}
	return len(names) > 0, names, nil
}

// Allows is an enforcing RBAC filter's decision: nil rules allow, ALLOW
// rules allow what a policy matches, DENY rules deny it, LOG rules allow.
func Allows(rules *rbacv3.RBAC, r *Request) (bool, error) {
	if rules == nil {
		return true, nil
	}
	m, _, err := Matched(rules, r)
	if err != nil {
		return false, err
	}
	switch rules.GetAction() {
	case rbacv3.RBAC_ALLOW:
		return m, nil
	case rbacv3.RBAC_DENY:
		return !m, nil
	case rbacv3.RBAC_LOG:
		return true, nil
	}
	return false, fmt.Errorf("%w: action %v", ErrUnsupported, rules.GetAction())
}

// MatchPolicy matches when a permission and a principal both match.
func MatchPolicy(p *rbacv3.Policy, r *Request) (bool, error) {
	if p.GetCondition() != nil || p.GetCheckedCondition() != nil {
		return false, fmt.Errorf("%w: CEL condition", ErrUnsupported)
	}
	perm, err := anyPerm(p.GetPermissions(), r)
	if err != nil || !perm {
		return false, err
	}
	return anyPrinc(p.GetPrincipals(), r)
}

func anyPerm(ps []*rbacv3.Permission, r *Request) (bool, error) {
	for _, p := range ps {
		ok, err := Permission(p, r)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

func anyPrinc(ps []*rbacv3.Principal, r *Request) (bool, error) {
	for _, p := range ps {
		ok, err := Principal(p, r)
		if err != nil || ok {
			return ok, err
		}
	}
	return false, nil
}

// Permission evaluates one permission.
func Permission(p *rbacv3.Permission, r *Request) (bool, error) {
	switch x := p.GetRule().(type) {
	case *rbacv3.Permission_Any:
		return x.Any, nil
	case *rbacv3.Permission_AndRules:
		for _, q := range x.AndRules.GetRules() {
			ok, err := Permission(q, r)
			if err != nil || !ok {
				return false, err
			}
		}
		return true, nil
	case *rbacv3.Permission_OrRules:
		return anyPerm(x.OrRules.GetRules(), r)
	case *rbacv3.Permission_NotRule:
		ok, err := Permission(x.NotRule, r)
		return !ok, err
	case *rbacv3.Permission_Header:
		return header(x.Header, r)
	case *rbacv3.Permission_UrlPath:
		if !r.HTTP {
			return false, nil
		}
		sm := x.UrlPath.GetPath()
		if sm == nil {
			return false, fmt.Errorf("%w: path matcher %T", ErrUnsupported, x.UrlPath.GetRule())
		}
		return stringMatch(sm, urlPath(r.Headers[":path"]))
	case *rbacv3.Permission_UriTemplate:
		if !r.HTTP {
			return false, nil
		}
		cfg := &uritemplatev3.UriTemplateMatchConfig{}
		if err := x.UriTemplate.GetTypedConfig().UnmarshalTo(cfg); err != nil {
			return false, fmt.Errorf("envoyrbac: uri_template: %w", err)
		}
		re, err := templateRegexp(cfg.GetPathTemplate())
		if err != nil {
			return false, err
		}
		return re.MatchString(urlPath(r.Headers[":path"])), nil
	case *rbacv3.Permission_DestinationIp:
		return inCIDR(x.DestinationIp, r.DestinationIP)
	case *rbacv3.Permission_DestinationPort:
		return x.DestinationPort == r.DestPort, nil
	case *rbacv3.Permission_DestinationPortRange:
		return r.DestPort >= uint32(x.DestinationPortRange.GetStart()) && r.DestPort < uint32(x.DestinationPortRange.GetEnd()), nil
	case *rbacv3.Permission_RequestedServerName:
		return stringMatch(x.RequestedServerName, r.SNI)
	case *rbacv3.Permission_Metadata:
		// No filter in front of RBAC sets dynamic metadata here, so a
		// metadata matcher sees no value: it matches only when inverted.
		return x.Metadata.GetInvert(), nil
	}
	return false, fmt.Errorf("%w: permission %T", ErrUnsupported, p.GetRule())
}

// Principal evaluates one principal.
func Principal(p *rbacv3.Principal, r *Request) (bool, error) {
	switch x := p.GetIdentifier().(type) {
	case *rbacv3.Principal_Any:
		return x.Any, nil
	case *rbacv3.Principal_AndIds:
		for _, q := range x.AndIds.GetIds() {
			ok, err := Principal(q, r)
			if err != nil || !ok {
				return false, err
			}
		}
		return true, nil
	case *rbacv3.Principal_OrIds:
		return anyPrinc(x.OrIds.GetIds(), r)
	case *rbacv3.Principal_NotId:
		ok, err := Principal(x.NotId, r)
		return !ok, err
	case *rbacv3.Principal_Authenticated_:
		// Without a TLS peer certificate, authenticated never matches.
		if r.Principal == "" {
			return false, nil
		}
		if x.Authenticated.GetPrincipalName() == nil {
			return true, nil
		}
		return stringMatch(x.Authenticated.GetPrincipalName(), r.Principal)
	case *rbacv3.Principal_DirectRemoteIp:
		return inCIDR(x.DirectRemoteIp, r.DirectRemoteIP)
	case *rbacv3.Principal_SourceIp: //nolint:staticcheck // deprecated, still Envoy's semantics: the peer address
		return inCIDR(x.SourceIp, r.DirectRemoteIP)
	case *rbacv3.Principal_RemoteIp:
		return inCIDR(x.RemoteIp, r.RemoteIP)
	case *rbacv3.Principal_Header:
		return header(x.Header, r)
	case *rbacv3.Principal_UrlPath:
		if !r.HTTP {
			return false, nil
		}
		return stringMatch(x.UrlPath.GetPath(), urlPath(r.Headers[":path"]))
	case *rbacv3.Principal_Metadata:
		return x.Metadata.GetInvert(), nil
	}
	return false, fmt.Errorf("%w: principal %T", ErrUnsupported, p.GetIdentifier())
}

// header is Envoy's HeaderUtility::matchHeaders. A missing header matches
// only present_match: false (or, inverted, only present_match: true); a TCP
// connection has no headers.
func header(h *routev3.HeaderMatcher, r *Request) (bool, error) {
	var v string
	present := false
	if r.HTTP {
		v, present = r.Headers[strings.ToLower(h.GetName())]
	}
	if !present && !h.GetTreatMissingHeaderAsEmpty() {
		pm, isPresent := h.GetHeaderMatchSpecifier().(*routev3.HeaderMatcher_PresentMatch)
		if h.GetInvertMatch() {
			return isPresent && pm.PresentMatch, nil
		}
		return isPresent && !pm.PresentMatch, nil
	}
	var ok bool
	var err error
	switch x := h.GetHeaderMatchSpecifier().(type) {
	case *routev3.HeaderMatcher_PresentMatch:
		ok = x.PresentMatch == present
	case *routev3.HeaderMatcher_StringMatch:
		ok, err = stringMatch(x.StringMatch, v)
	case *routev3.HeaderMatcher_ExactMatch: //nolint:staticcheck // deprecated forms still mean what they say
		ok = v == x.ExactMatch
	case *routev3.HeaderMatcher_PrefixMatch: //nolint:staticcheck
		ok = strings.HasPrefix(v, x.PrefixMatch)
	case *routev3.HeaderMatcher_SuffixMatch: //nolint:staticcheck
		ok = strings.HasSuffix(v, x.SuffixMatch)
	case nil:
		ok = true
	default:
		return false, fmt.Errorf("%w: header matcher %T", ErrUnsupported, x)
	}
	if err != nil {
		return false, err
	}
	return ok != h.GetInvertMatch(), nil
}

func stringMatch(m *matcherv3.StringMatcher, v string) (bool, error) {
	ic := m.GetIgnoreCase()
	fold := func(s string) string {
		if ic {
			return strings.ToLower(s)
		}
		return s
	}
	switch x := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		return fold(v) == fold(x.Exact), nil
	case *matcherv3.StringMatcher_Prefix:
		return strings.HasPrefix(fold(v), fold(x.Prefix)), nil
	case *matcherv3.StringMatcher_Suffix:
		return strings.HasSuffix(fold(v), fold(x.Suffix)), nil
	case *matcherv3.StringMatcher_Contains:
		return strings.Contains(fold(v), fold(x.Contains)), nil
	case *matcherv3.StringMatcher_SafeRegex:
		re, err := compile("^(?:" + x.SafeRegex.GetRegex() + ")$")
		if err != nil {
			return false, err
		}
		return re.MatchString(v), nil
	}
	return false, fmt.Errorf("%w: string matcher %T", ErrUnsupported, m.GetMatchPattern())
}

func inCIDR(c *corev3.CidrRange, ip netip.Addr) (bool, error) {
	if !ip.IsValid() {
		return false, nil
	}
	a, err := netip.ParseAddr(c.GetAddressPrefix())
	if err != nil {
		return false, fmt.Errorf("envoyrbac: cidr %q: %w", c.GetAddressPrefix(), err)
	}
	bits := a.BitLen()
	if c.GetPrefixLen() != nil {
		bits = int(c.GetPrefixLen().GetValue())
	}
	p, err := a.Prefix(bits)
	if err != nil {
		return false, fmt.Errorf("envoyrbac: cidr %v: %w", c, err)
	}
	return p.Contains(ip.Unmap()), nil
}

// urlPath is the path without query and fragment, as url_path sees it.
func urlPath(p string) string {
	if i := strings.IndexAny(p, "?#"); i >= 0 {
		return p[:i]
	}
	return p
}

var (
	reMu    sync.Mutex
	reCache = map[string]*regexp.Regexp{}
)

func compile(expr string) (*regexp.Regexp, error) {
	reMu.Lock()
	defer reMu.Unlock()
	if re, ok := reCache[expr]; ok {
		return re, nil
	}
	re, err := regexp.Compile(expr)
	if err != nil {
		return nil, fmt.Errorf("envoyrbac: regex %q: %w", expr, err)
	}
	reCache[expr] = re
	return re, nil
}

// templateLiteral is Envoy's uri_template pchar set (RFC 3986 without '*'
// and '=').
const templateLiteral = `a-zA-Z0-9\-._~%!$&'()+,;:@`

// templateRegexp is Envoy's uri_template matcher for templates made of
// literal segments, '*' (one segment) and '**' (any run of segments, the
// last operator). Variables are not supported.
func templateRegexp(t string) (*regexp.Regexp, error) {
	if !strings.HasPrefix(t, "/") || strings.ContainsAny(t, "{}") {
		return nil, fmt.Errorf("%w: uri template %q", ErrUnsupported, t)
	}
	var b strings.Builder
	b.WriteString("^")
	for _, seg := range strings.Split(t[1:], "/") {
		b.WriteString("/")
		switch seg {
		case "*":
			b.WriteString("[" + templateLiteral + "]+")
		case "**":
			b.WriteString("[" + templateLiteral + "/]*")
		default:
			if strings.Contains(seg, "*") {
				return nil, fmt.Errorf("%w: uri template %q: operator inside a segment", ErrUnsupported, t)
			}
			b.WriteString(regexp.QuoteMeta(seg))
		}
	}
	b.WriteString("$")
	return compile(b.String())
}
