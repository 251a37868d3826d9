// Package rbac is the Envoy RBAC back end of the policy model: it turns the
// AuthorizationPolicies that apply to one workload into
// envoy.config.rbac.v3.RBAC configurations, for proxies (or proxyless gRPC
// clients) that enforce policy without calling ext_authz.
//
// As in Istio, DENY and ALLOW policies become two filters evaluated in that
// order; dry-run policies become shadow filters; AUDIT policies a LOG
// filter. CUSTOM policies cannot be expressed in RBAC (they need the
// ext_authz filter) and are refused rather than dropped. Paths are matched
// as Envoy receives them, so the listener must normalize them as
// authz/pathnorm documents.
//
// Each rule becomes one RBAC policy named "ns[NS]-policy[NAME]-rule[I]"
// whose single permission ANDs the operations (ORed) with the conditions
// on the destination, and whose single principal ANDs the sources (ORed)
// with the conditions on the source.
//
// Peer IDs are matched as strings, never parsed. Outside ALLOW, namespaces
// and serviceAccounts are Istio's regexps on the whole ID (".*/ns/NS/.*"),
// whose "." does not match a newline in RE2 (Envoy's and gRPC's
// safe_regex, matched in full); in ALLOW, namespaces is
// "spiffe://[^/]+/ns/NS/sa/[^/]+", whose [^/] does. So, as in Istio, a
// peer whose URI SAN is "spiffe://t\nd/ns/x/sa/y" would pass a DENY on
// namespace x while an ALLOW on x matched it. The ext_authz engine denies
// such a peer before evaluating anything (engine.ReasonPeerRejected);
// these filters cannot, so whoever installs them must keep such peers out
// first. The one user, the proxyless gRPC chain of xds/proxyconfig, does
// twice: grpc-go's crypto/x509 refuses a URI SAN with a control byte, and
// the chain's first filter denies every peer without a URI SAN matching
// "^spiffe://TD/.+$" (TestProxylessDeniesNewlinePeers). Envoy's
// authenticated matcher tries every URI SAN, then the DNS SANs, then the
// subject. This is reasoned from the generated matchers and RE2's syntax;
// no Envoy runs in the tests.
package rbac

import (
	"errors"
	"fmt"
	"regexp"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trustmesh/trustmesh/authz/policy"
)

// ErrCustom refuses CUSTOM policies, which RBAC cannot enforce.
var ErrCustom = errors.New("rbac: CUSTOM policies need the ext_authz filter")

// Filters are the RBAC configurations for one workload. A nil filter means
// no policy of that kind applies.
type Filters struct {
	Deny        *rbacv3.RBAC
	Allow       *rbacv3.RBAC
	ShadowDeny  *rbacv3.RBAC
	ShadowAllow *rbacv3.RBAC
	Audit       *rbacv3.RBAC
}

// Build converts the policies that apply to one workload (the caller
// selects them: root namespace and the workload's namespace, by selector).
// With tcp, rules are converted as policy.Rule.ForTCP says.
func Build(ps []*policy.Policy, tcp bool) (*Filters, error) {
	f := &Filters{}
	for _, p := range ps {
		var target **rbacv3.RBAC
		action := rbacv3.RBAC_ALLOW
		switch {
		case p.Action == policy.Custom:
			return nil, fmt.Errorf("%w: %s", ErrCustom, p.Key())
		case p.Action == policy.Audit:
			target, action = &f.Audit, rbacv3.RBAC_LOG
		case p.Action == policy.Deny && p.DryRun:
			target, action = &f.ShadowDeny, rbacv3.RBAC_DENY
		case p.Action == policy.Deny:
			target, action = &f.Deny, rbacv3.RBAC_DENY
		case p.DryRun:
			target = &f.ShadowAllow
		default:
			target = &f.Allow
		}
		if *target == nil {
			// An ALLOW filter with no policies denies everything, which is
			// what an ALLOW policy without rules means.
			*target = &rbacv3.RBAC{Action: action, Policies: map[string]*rbacv3.Policy{}}
		}
		for i, r := range p.Rules {
			if tcp {
				var ok bool
				if r, ok = r.ForTCP(p.Action); !ok {
					continue
				}
			}
			rp, err := rule(r, p.Action)
			if err != nil {
				return nil, fmt.Errorf("rbac: %s: %w", p.Key(), err)
			}
			(*target).Policies[fmt.Sprintf("ns[%s]-policy[%s]-rule[%d]", p.Namespace, p.Name, i)] = rp
		}
	}
	return f, nil
}

func rule(r policy.Rule, a policy.Action) (*rbacv3.Policy, error) {
	var perms []*rbacv3.Permission
	var princs []*rbacv3.Principal
	if len(r.To) > 0 {
		var ors []*rbacv3.Permission
		for _, m := range r.To {
			var ands []*rbacv3.Permission
			for _, f := range m {
				p, err := permission(f, a)
				if err != nil {
					return nil, err
				}
				ands = append(ands, p)
			}
			ors = append(ors, andPerms(ands))
		}
		perms = append(perms, orPerms(ors))
	}
	if len(r.From) > 0 {
		var ors []*rbacv3.Principal
		for _, m := range r.From {
			var ands []*rbacv3.Principal
			for _, f := range m {
				p, err := principal(f, a)
				if err != nil {
					return nil, err
				}
				ands = append(ands, p)
			}
			ors = append(ors, andIDs(ands))
		}
		princs = append(princs, orIDs(ors))
	}
	for _, f := range r.When {
		if principalSide(f.Attr) {
			p, err := principal(f, a)
			if err != nil {
				return nil, err
			}
			princs = append(princs, p)
			continue
		}
		p, err := permission(f, a)
		if err != nil {
			return nil, err
		}
		perms = append(perms, p)
	}
	return &rbacv3.Policy{
		Permissions: []*rbacv3.Permission{andPerms(perms)},
		Principals:  []*rbacv3.Principal{andIDs(princs)},
	}, nil
}

func principalSide(a policy.Attribute) bool {
	switch a {
	case policy.SourcePrincipal, policy.SourceNamespace, policy.SourceServiceAccount, policy.SourceTrustDomain,
		policy.SourceIP, policy.RemoteIP, policy.Header:
		return true
	}
	return false
}

// anyPeer matches any peer with a SPIFFE identity.
func anyPeer() *rbacv3.Principal {
	return authenticated(regex(`spiffe://.+`))
}

func principal(f policy.Field, a policy.Action) (*rbacv3.Principal, error) {
	var ors []*rbacv3.Principal
	for _, v := range f.Values {
		var p *rbacv3.Principal
		if re, ok := policy.IstioPeerRegexp(f.Attr, v); ok && a != policy.Allow {
			// Outside ALLOW, Istio's regex on the whole SPIFFE ID.
			ors = append(ors, authenticated(regex(re)))
			continue
		}
		switch f.Attr {
		case policy.SourcePrincipal:
			p = authenticated(principalMatcher(v))
		case policy.SourceNamespace:
			p = authenticated(regex(`spiffe://[^/]+/ns/` + segmentRegex(v) + `/sa/[^/]+`))
		case policy.SourceServiceAccount:
			p = authenticated(regex(`spiffe://[^/]+/ns/` + saRegex(v.S))) // v.S is "ns/sa"
		case policy.SourceTrustDomain:
			p = authenticated(regex(`spiffe://` + segmentRegex(v) + `/.*`))
		case policy.SourceIP:
			p = &rbacv3.Principal{Identifier: &rbacv3.Principal_DirectRemoteIp{DirectRemoteIp: cidr(v)}}
		case policy.RemoteIP:
			p = &rbacv3.Principal{Identifier: &rbacv3.Principal_RemoteIp{RemoteIp: cidr(v)}}
		case policy.Header:
			p = &rbacv3.Principal{Identifier: &rbacv3.Principal_Header{Header: header(f.HeaderName, v, false)}}
		default:
			return nil, fmt.Errorf("%s: attribute %v is not a source attribute", f.Name, f.Attr)
		}
		ors = append(ors, p)
	}
	p := orIDs(ors)
	if !f.Not {
		return p, nil
	}
	not := &rbacv3.Principal{Identifier: &rbacv3.Principal_NotId{NotId: p}}
	if f.Attr.NeedsPeer() && a == policy.Allow {
		// As in the Rego back end: a negated peer field in an ALLOW policy
		// never matches a request without a peer identity.
		return andIDs([]*rbacv3.Principal{anyPeer(), not}), nil
	}
	return not, nil
}

func permission(f policy.Field, a policy.Action) (*rbacv3.Permission, error) {
	if f.Attr == policy.Host {
		return hostPermission(f, a), nil
	}
	var ors []*rbacv3.Permission
	for _, v := range f.Values {
		var p *rbacv3.Permission
		switch f.Attr {
		case policy.Method:
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: header(":method", v, false)}}
		case policy.Path:
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_UrlPath{UrlPath: &matcherv3.PathMatcher{
				Rule: &matcherv3.PathMatcher_Path{Path: stringMatcher(v, false)}}}}
		case policy.Header:
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: header(f.HeaderName, v, false)}}
		case policy.DestinationPort:
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationPort{DestinationPort: uint32(v.Port)}}
		case policy.DestinationIP:
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_DestinationIp{DestinationIp: cidr(v)}}
		case policy.SNI:
			p = &rbacv3.Permission{Rule: &rbacv3.Permission_RequestedServerName{RequestedServerName: stringMatcher(v, false)}}
		default:
			return nil, fmt.Errorf("%s: attribute %v is not a destination attribute", f.Name, f.Attr)
		}
		ors = append(ors, p)
	}
	p := orPerms(ors)
	if f.Not {
		return &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}}, nil
	}
	return p, nil
}

// hostPermission matches hosts and notHosts as the Rego back end does: an
// ALLOW hosts is Istio's matcher on :authority as sent; elsewhere the host
// is also tried normalized (without a :port and one trailing dot), so a
// DENY matches either form and an ALLOW notHosts needs neither form
// listed.
func hostPermission(f policy.Field, a policy.Action) *rbacv3.Permission {
	// raw matches the host as sent; norm, one per value, the normalized
	// host (the raw matcher where it already does); extra is norm without
	// the raw matchers it repeats.
	var raw, norm, extra []*rbacv3.Permission
	for _, v := range f.Values {
		r := &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: header(":authority", v, true)}}
		raw = append(raw, r)
		m := normalizedHostMatcher(v)
		if m == nil {
			norm = append(norm, r)
			continue
		}
		n := &rbacv3.Permission{Rule: &rbacv3.Permission_Header{Header: &routev3.HeaderMatcher{
			Name: ":authority", HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: m}}}}
		norm, extra = append(norm, n), append(extra, n)
	}
	notPerm := func(p *rbacv3.Permission) *rbacv3.Permission {
		return &rbacv3.Permission{Rule: &rbacv3.Permission_NotRule{NotRule: p}}
	}
	switch {
	case a == policy.Allow && !f.Not:
		return orPerms(raw)
	case a == policy.Allow:
		return notPerm(orPerms(append(raw, extra...)))
	case !f.Not:
		return orPerms(append(raw, extra...))
	case len(extra) == 0:
		return notPerm(orPerms(raw))
	}
	// Either form is not listed: each negation covers every value.
	return orPerms([]*rbacv3.Permission{notPerm(orPerms(raw)), notPerm(orPerms(norm))})
}

// normalizedHostMatcher matches an :authority whose normalized form
// matches v, or returns nil when the matcher on the host as sent already
// does (prefix and presence).
func normalizedHostMatcher(v policy.Value) *matcherv3.StringMatcher {
	const portAndDot = `\.?(:[0-9]*)?`
	switch v.Kind {
	case policy.Exact:
		return regex(`(?i)` + regexp.QuoteMeta(v.S) + portAndDot)
	case policy.Suffix:
		return regex(`(?i).*` + regexp.QuoteMeta(v.S) + portAndDot)
	}
	return nil
}

// stringMatcher matches Istio's exact, prefix, suffix and presence forms;
// presence means a non-empty value, as in the Rego back end.
func stringMatcher(v policy.Value, ignoreCase bool) *matcherv3.StringMatcher {
	m := &matcherv3.StringMatcher{IgnoreCase: ignoreCase}
	switch v.Kind {
	case policy.Exact:
		m.MatchPattern = &matcherv3.StringMatcher_Exact{Exact: v.S}
	case policy.Prefix:
		m.MatchPattern = &matcherv3.StringMatcher_Prefix{Prefix: v.S}
	case policy.Suffix:
		m.MatchPattern = &matcherv3.StringMatcher_Suffix{Suffix: v.S}
	case policy.Presence:
		m = regex(`.+`)
	case policy.Template:
		m = regex(v.Regexp)
	}
	return m
}

// principalMatcher compares a principal pattern with the peer's URI SAN.
func principalMatcher(v policy.Value) *matcherv3.StringMatcher {
	switch v.Kind {
	case policy.Exact:
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Exact{Exact: "spiffe://" + v.S}}
	case policy.Prefix:
		return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_Prefix{Prefix: "spiffe://" + v.S}}
	case policy.Suffix:
		return regex(`spiffe://.*` + regexp.QuoteMeta(v.S))
	}
	return regex(`spiffe://.+`)
}

// segmentRegex matches one path segment of a SPIFFE ID against a value.
func segmentRegex(v policy.Value) string {
	q := regexp.QuoteMeta(v.S)
	switch v.Kind {
	case policy.Prefix:
		return q + `[^/]*`
	case policy.Suffix:
		return `[^/]*` + q
	case policy.Presence:
		return `[^/]+`
	}
	return q
}

func saRegex(nsSA string) string {
	for i := 0; i < len(nsSA); i++ {
		if nsSA[i] == '/' {
			return regexp.QuoteMeta(nsSA[:i]) + `/sa/` + regexp.QuoteMeta(nsSA[i+1:])
		}
	}
	return regexp.QuoteMeta(nsSA)
}

func regex(re string) *matcherv3.StringMatcher {
	return &matcherv3.StringMatcher{MatchPattern: &matcherv3.StringMatcher_SafeRegex{SafeRegex: &matcherv3.RegexMatcher{Regex: re}}}
}

func authenticated(m *matcherv3.StringMatcher) *rbacv3.Principal {
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_Authenticated_{Authenticated: &rbacv3.Principal_Authenticated{PrincipalName: m}}}
}

func header(name string, v policy.Value, ignoreCase bool) *routev3.HeaderMatcher {
	if v.Kind == policy.Presence {
		return &routev3.HeaderMatcher{Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_PresentMatch{PresentMatch: true}}
	}
	return &routev3.HeaderMatcher{Name: name, HeaderMatchSpecifier: &routev3.HeaderMatcher_StringMatch{StringMatch: stringMatcher(v, ignoreCase)}}
}

func cidr(v policy.Value) *corev3.CidrRange {
	return &corev3.CidrRange{AddressPrefix: v.Prefix.Addr().String(), PrefixLen: wrapperspb.UInt32(uint32(v.Prefix.Bits()))}
}

func andIDs(ps []*rbacv3.Principal) *rbacv3.Principal {
	switch len(ps) {
	case 0:
		return &rbacv3.Principal{Identifier: &rbacv3.Principal_Any{Any: true}}
	case 1:
		return ps[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_AndIds{AndIds: &rbacv3.Principal_Set{Ids: ps}}}
}

func orIDs(ps []*rbacv3.Principal) *rbacv3.Principal {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbacv3.Principal{Identifier: &rbacv3.Principal_OrIds{OrIds: &rbacv3.Principal_Set{Ids: ps}}}
}

func andPerms(ps []*rbacv3.Permission) *rbacv3.Permission {
	switch len(ps) {
	case 0:
		return &rbacv3.Permission{Rule: &rbacv3.Permission_Any{Any: true}}
	case 1:
		return ps[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_AndRules{AndRules: &rbacv3.Permission_Set{Rules: ps}}}
}

func orPerms(ps []*rbacv3.Permission) *rbacv3.Permission {
	if len(ps) == 1 {
		return ps[0]
	}
	return &rbacv3.Permission{Rule: &rbacv3.Permission_OrRules{OrRules: &rbacv3.Permission_Set{Rules: ps}}}
}
