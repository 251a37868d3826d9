// Package policy is trustmesh's typed model of Istio AuthorizationPolicies.
//
// Parse and FromSpec turn security.istio.io/v1 and v1beta1 objects (the
// istio.io/api security/v1beta1 types serve both) into Policy values. Every
// field of istio.io/api v1.31 is either mapped into the model exactly or
// refused with a *FieldError that names it, so a policy is never silently
// widened or weakened. The back ends (authz/rego, authz/rbac) only ever see
// the model.
package policy

import (
	"net/netip"
	"regexp"
	"strconv"
	"strings"
)

// Action is what a policy does when one of its rules matches.
type Action int

// The actions, in Istio's evaluation order.
const (
	Custom Action = iota
	Deny
	Allow
	Audit
)

func (a Action) String() string {
	switch a {
	case Custom:
		return "CUSTOM"
	case Deny:
		return "DENY"
	case Allow:
		return "ALLOW"
	case Audit:
		return "AUDIT"
	}
	return "Action(" + strconv.Itoa(int(a)) + ")"
}

// Policy is one validated AuthorizationPolicy.
type Policy struct {
	Namespace string
	Name      string
	// Origin names where the policy came from (a file, or a Kubernetes
	// object) for error messages.
	Origin string
	Action Action
	// Provider is the extension provider a CUSTOM policy names.
	Provider string
	// Selector holds the matchLabels a destination workload must carry. A
	// nil Selector selects every workload in scope.
	Selector map[string]string
	// DryRun policies are evaluated and logged, never enforced.
	DryRun bool
	// Rules are ORed. No rules match nothing; an empty rule matches
	// everything.
	Rules []Rule
}

// Key is "namespace/name", as decision logs show it.
func (p *Policy) Key() string { return p.Namespace + "/" + p.Name }

// Selects reports whether the policy's selector matches a workload's
// labels: every matchLabel present with the same value. A nil selector
// selects every workload.
func (p *Policy) Selects(labels map[string]string) bool {
	for k, v := range p.Selector {
		if got, ok := labels[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Applicable returns, in order, the policies that apply to a workload in
// namespace ns with the given labels: those of the root namespace and of ns
// whose selector matches. The authz engine, the RBAC pushed over xDS and
// the conformance tests all select policies through it.
func Applicable(policies []*Policy, root, ns string, labels map[string]string) []*Policy {
	var out []*Policy
	for _, p := range policies {
		if (p.Namespace == root || p.Namespace == ns) && p.Selects(labels) {
			out = append(out, p)
		}
	}
	return out
}

// Rule matches when one From entry, one To entry and every When condition
// match. An empty From or To matches anything.
type Rule struct {
	From []Match // the sources, ORed
	To   []Match // the operations, ORed
	When []Field // the conditions, ANDed
}

// Match is one source or operation: its fields are ANDed.
type Match []Field

// Attribute names a request attribute a field is matched against.
type Attribute int

// The attributes trustmesh implements.
const (
	SourcePrincipal      Attribute = iota // peer SPIFFE ID without "spiffe://"
	SourceNamespace                       // namespace from the peer SPIFFE ID
	SourceServiceAccount                  // "namespace/serviceaccount" from the peer SPIFFE ID
	SourceTrustDomain                     // trust domain of the peer SPIFFE ID
	SourceIP                              // address of the direct peer
	RemoteIP                              // original client address (x-envoy-external-address, else the peer)
	DestinationIP
	DestinationPort
	SNI // connection.sni
	Host
	Method
	Path // normalized, without the query string
	Header
)

var attributeNames = [...]string{
	SourcePrincipal:      "source.principal",
	SourceNamespace:      "source.namespace",
	SourceServiceAccount: "source.serviceAccount",
	SourceTrustDomain:    "source.trustDomain",
	SourceIP:             "source.ip",
	RemoteIP:             "remote.ip",
	DestinationIP:        "destination.ip",
	DestinationPort:      "destination.port",
	SNI:                  "connection.sni",
	Host:                 "request.host",
	Method:               "request.method",
	Path:                 "request.path",
	Header:               "request.headers",
}

func (a Attribute) String() string {
	if int(a) < len(attributeNames) {
		return attributeNames[a]
	}
	return "Attribute(" + strconv.Itoa(int(a)) + ")"
}

// HTTPOnly reports whether the attribute exists only for HTTP requests; such
// fields are dropped from TCP checks (see Rule.ForTCP).
func (a Attribute) HTTPOnly() bool {
	return a == Host || a == Method || a == Path || a == Header
}

// NeedsPeer reports whether the attribute comes from the peer certificate,
// so that a request without a peer identity never matches it.
func (a Attribute) NeedsPeer() bool {
	return a == SourcePrincipal || a == SourceNamespace || a == SourceServiceAccount || a == SourceTrustDomain
}

// Field is one field of a source or operation, or one when condition: the
// attribute matches if any value matches (or, with Not, if none does).
type Field struct {
	// Name is the field's path in the policy, e.g.
	// "rules[0].from[1].source.notPrincipals".
	Name string
	Attr Attribute
	// HeaderName is the lower-cased header for Attr == Header.
	HeaderName string
	Not        bool
	Values     []Value
}

// ValueKind says how a value is matched.
type ValueKind int

// The kinds of values.
const (
	Exact    ValueKind = iota // "abc"
	Prefix                    // "abc*"
	Suffix                    // "*abc"
	Presence                  // "*": any non-empty value; for headers and hosts, present at all (Envoy present_match)
	Template                  // a path with {*} or {**}
	CIDR                      // an IP block
	Port                      // a port number
)

// Value is one value of a field.
type Value struct {
	Kind ValueKind
	// S is the string to compare for Exact, Prefix and Suffix (without the
	// '*'), and the original template for Template.
	S string
	// Regexp is the anchored regular expression for Template.
	Regexp string
	Prefix netip.Prefix
	Port   int
}

// ForTCP returns the rule as it applies to a TCP (non-HTTP) check, as Istio
// does: a rule of an ALLOW policy that uses an HTTP-only field is dropped
// (ok is false) so that it allows nothing; in other actions only the
// HTTP-only fields are dropped, so the rule matches more and, in a DENY
// policy, denies more.
func (r Rule) ForTCP(a Action) (tcp Rule, ok bool) {
	if !r.usesHTTP() {
		return r, true
	}
	if a == Allow {
		return Rule{}, false
	}
	tcp.From = dropHTTP(r.From)
	tcp.To = dropHTTP(r.To)
	for _, f := range r.When {
		if !f.Attr.HTTPOnly() {
			tcp.When = append(tcp.When, f)
		}
	}
	return tcp, true
}

// EachField calls fn for every field of the rule.
func (r Rule) EachField(fn func(Field)) {
	for _, ms := range [][]Match{r.From, r.To, {r.When}} {
		for _, m := range ms {
			for _, f := range m {
				fn(f)
			}
		}
	}
}

func (r Rule) usesHTTP() bool {
	for _, ms := range [][]Match{r.From, r.To, {r.When}} {
		for _, m := range ms {
			for _, f := range m {
				if f.Attr.HTTPOnly() {
					return true
				}
			}
		}
	}
	return false
}

func dropHTTP(ms []Match) []Match {
	if ms == nil {
		return nil
	}
	out := make([]Match, 0, len(ms))
	for _, m := range ms {
		var kept Match
		for _, f := range m {
			if !f.Attr.HTTPOnly() {
				kept = append(kept, f)
			}
		}
		// A match whose every field was dropped matches anything.
		out = append(out, kept)
	}
	return out
}

// IstioPeerRegexp returns the regular expression Istio's compiler matches
// against the peer's whole SPIFFE ID ("spiffe://...") for a namespaces or
// serviceAccounts value (also source.namespace): ".*/ns/NS/.*" and
// "spiffe://.+/ns/NS/(.+/|)sa/SA(/.+)?". They also match IDs longer than
// spiffe://TD/ns/NS/sa/SA, which DENY, AUDIT and CUSTOM rules must not
// spare. ok is false for other attributes.
func IstioPeerRegexp(a Attribute, v Value) (re string, ok bool) {
	switch a {
	case SourceNamespace:
		var ns string
		switch v.Kind {
		case Prefix:
			ns = regexp.QuoteMeta(v.S) + ".*"
		case Suffix:
			ns = ".*" + regexp.QuoteMeta(v.S)
		case Presence:
			ns = ".*"
		default:
			ns = regexp.QuoteMeta(v.S)
		}
		return ".*/ns/" + ns + "/.*", true
	case SourceServiceAccount:
		ns, sa, _ := strings.Cut(v.S, "/")
		return "spiffe://.+/ns/" + regexp.QuoteMeta(ns) + "/(.+/|)sa/" + regexp.QuoteMeta(sa) + "(/.+)?", true
	}
	return "", false
}
