// Package rego is the Rego back end of the policy model: it compiles
// AuthorizationPolicies (authz/policy) into Rego modules that OPA
// evaluates.
//
// Each policy becomes one package, data.trustmesh.policy.<id>, with two
// partial sets of the indexes of its matching rules: "http" for HTTP checks
// and "tcp" for TCP checks (see policy.Rule.ForTCP). The entry module,
// data.trustmesh.authz, evaluates only the policies whose ids the caller
// lists in input.policies, so the caller's per-workload index decides which
// policies run:
//
//	data.trustmesh.authz.matches == {id: {rule index, ...}, ...}
//
// The generated modules read a flat input object, which the engine builds
// from the CheckRequest; its keys are the Istio attribute names (absent
// attributes are absent keys, never empty strings):
//
//	input.proto                        "http" or "tcp"
//	input.policies                     [id, ...]
//	input["source.principal"]          peer SPIFFE ID without "spiffe://"
//	input["source.namespace"]          from the peer SPIFFE ID
//	input["source.serviceAccount"]     "namespace/serviceaccount" from the peer SPIFFE ID
//	input["source.trustDomain"]        trust domain of the peer SPIFFE ID
//	input["source.ip"]                 direct peer address
//	input["remote.ip"]                 original client address
//	input["destination.ip"]
//	input["destination.port"]          number
//	input["connection.sni"]
//	input["request.host"]              lower-cased, as sent
//	input["request.host.normalized"]   lower-cased, without a :port and one trailing dot
//	input["request.method"]
//	input["request.path"]              normalized (authz/pathnorm), no query
//	input["request.headers[NAME]"]     lower-cased NAME; only headers some policy names
package rego

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
)

// Package paths of the generated modules.
const (
	PolicyPackage = "trustmesh.policy"
	EntryPackage  = "trustmesh.authz"
	// MatchesQuery is the query the engine prepares once per policy set.
	MatchesQuery = "data.trustmesh.authz.matches"
)

// EntryModule returns the entry module that evaluates the listed policies.
func EntryModule() string {
	return `package ` + EntryPackage + `

# matches maps each listed policy id to the set of its rules that match.
matches[id] := rules if {
	some id in input.policies
	rules := data.` + PolicyPackage + `[id][input.proto]
}
`
}

// ID returns the package-safe id of the i-th policy of a set.
func ID(i int) string { return "p" + strconv.Itoa(i) }

// Module compiles one policy into a Rego module in package
// trustmesh.policy.<id>. A policy without rules compiles to a package that
// never matches.
func Module(id string, p *policy.Policy) string {
	return module(id, p, false)
}

// Explain names the rules an explain module adds to a policy's package:
// explain_http and explain_tcp, the sets of the names of the fields
// (policy.Field.Name) that match, per protocol. ExplainQuery reads them for
// the listed policies.
const (
	ExplainPackage = "trustmesh.explain"
	ExplainQuery   = "data.trustmesh.explain.fields"
)

// ExplainModule is Module(id, p) followed by the explain_http and
// explain_tcp rules: each field's outcome, made of the very expressions
// (and helper rules) the policy's rules are made of, so that the
// explanation of a decision is evaluated by the same Rego that decided it.
// The engine serves with Module; only `trustmesh policy explain` compiles
// ExplainModule.
func ExplainModule(id string, p *policy.Policy) string {
	return module(id, p, true)
}

// ExplainEntryModule maps each policy id listed in input.policies to the
// set of its fields that match for input.proto; a policy none of whose
// fields match is absent.
func ExplainEntryModule() string {
	return `package ` + ExplainPackage + `

fields[id] := f if {
	some id in input.policies
	f := data.` + PolicyPackage + `[id][concat("_", ["explain", input.proto])]
}
`
}

func module(id string, p *policy.Policy, explain bool) string {
	g := &gen{explain: explain}
	g.printf("package %s.%s\n\n", PolicyPackage, id)
	g.printf("# %s (%s) from %s\n", p.Key(), p.Action, p.Origin)
	if len(p.Rules) == 0 {
		g.printf("# no rules: matches nothing\n")
		g.printf("http := set()\n\ntcp := set()\n")
		return g.b.String()
	}
	for i, r := range p.Rules {
		g.rule("http", i, r, p.Action)
		if tr, ok := r.ForTCP(p.Action); ok {
			g.rule("tcp", i, tr, p.Action)
		} else {
			g.printf("# rules[%d] uses HTTP-only fields: dropped for TCP in an ALLOW policy\n\n", i)
		}
	}
	if !g.hasTCP {
		g.printf("tcp := set()\n")
	}
	if explain {
		g.explainRules()
	}
	return g.b.String()
}

type gen struct {
	b      strings.Builder
	hasTCP bool
	// explain records each field's expressions (fields) for explainRules;
	// proto is the set the rule being generated belongs to.
	explain bool
	proto   string
	fields  []fieldExprs
}

type fieldExprs struct {
	proto, name string
	exprs       []string
}

// use records the expressions a field put in a rule body and returns them.
func (g *gen) use(f policy.Field, exprs []string) []string {
	if g.explain {
		g.fields = append(g.fields, fieldExprs{proto: g.proto, name: f.Name, exprs: exprs})
	}
	return exprs
}

// explainRules emits `explain_<proto> contains "<field name>" if {...}`
// with each field's own expressions.
func (g *gen) explainRules() {
	g.printf("\n# explain: the fields that match\n")
	for _, f := range g.fields {
		g.printf("explain_%s contains %s if {\n", f.proto, quote(f.name))
		for _, e := range f.exprs {
			g.printf("\t%s\n", e)
		}
		g.printf("}\n\n")
	}
}

func (g *gen) printf(format string, args ...any) { fmt.Fprintf(&g.b, format, args...) }

// rule emits `<proto> contains i if {...}` and its helpers.
func (g *gen) rule(proto string, i int, r policy.Rule, a policy.Action) {
	if proto == "tcp" {
		g.hasTCP = true
	}
	g.proto = proto
	prefix := fmt.Sprintf("%s_r%d", proto, i)
	var body []string
	if len(r.From) > 0 {
		body = append(body, g.matches(prefix+"_from", r.From, a))
	}
	if len(r.To) > 0 {
		body = append(body, g.matches(prefix+"_to", r.To, a))
	}
	for k, f := range r.When {
		body = append(body, g.use(f, g.field(fmt.Sprintf("%s_when%d", prefix, k), f, a))...)
	}
	if len(body) == 0 {
		g.printf("%s contains %d\n\n", proto, i)
		return
	}
	g.printf("%s contains %d if {\n", proto, i)
	for _, e := range body {
		g.printf("\t%s\n", e)
	}
	g.printf("}\n\n")
}

// matches emits one rule per entry (ORed by sharing a name) and returns the
// expression that references them.
func (g *gen) matches(name string, ms []policy.Match, a policy.Action) string {
	for j, m := range ms {
		var body []string
		for k, f := range m {
			body = append(body, g.use(f, g.field(fmt.Sprintf("%s%d_f%d", name, j, k), f, a))...)
		}
		if len(body) == 0 {
			g.printf("%s if true\n\n", name)
			continue
		}
		g.printf("%s if {\n", name)
		for _, e := range body {
			g.printf("\t%s\n", e)
		}
		g.printf("}\n\n")
	}
	return name
}

// field emits a helper that is true when any value matches and returns the
// expressions that use it in a rule body.
//
// A negated field negates a helper rule, never an expression: OPA binds the
// attribute outside a negated call (startswith, endswith, in, !=,
// regex.match, net.cidr_contains, is_string), so `not f(input[k])` is
// false, not true, when input[k] is absent. As in Envoy RBAC (not_id,
// not_rule), a negated field holds when the request lacks the attribute:
// `not helper` is true when helper is undefined.
func (g *gen) field(name string, f policy.Field, a policy.Action) []string {
	if f.Attr == policy.Host {
		return g.hostField(name, f, a)
	}
	ref := attrRef(f)
	comment := " # " + f.Name
	if a != policy.Allow && (f.Attr == policy.SourceNamespace || f.Attr == policy.SourceServiceAccount) {
		// Outside ALLOW, as Istio's regexes on the whole SPIFFE ID, which
		// also match IDs longer than spiffe://TD/ns/NS/sa/SA.
		ref = `concat("", ["spiffe://", input[` + quote(policy.SourcePrincipal.String()) + `]])`
		f = istioPeerField(f)
	}
	if !f.Not {
		return []string{g.fieldExpr(name, ref, f) + comment}
	}
	g.helper(name, f, ref)
	// A negated field never matches a request that lacks a peer identity in
	// an ALLOW policy, so a missing certificate never opens access; in the
	// other actions it matches (as in Istio), so DENY policies deny more.
	if f.Attr.NeedsPeer() && a == policy.Allow {
		return []string{ref, "not " + name + comment}
	}
	return []string{"not " + name + comment}
}

// fieldExpr returns one expression that is true when any value matches: a
// comparison or set membership when it can, else a helper rule with one
// definition per value.
func (g *gen) fieldExpr(name, ref string, f policy.Field) string {
	switch {
	case len(f.Values) == 1:
		return valueExpr(ref, f, f.Values[0])
	case allExact(f):
		return exactSetExpr(ref, f)
	}
	g.helper(name, f, ref)
	return name
}

// helper emits a rule named name that is true when any value of f matches
// any of refs.
func (g *gen) helper(name string, f policy.Field, refs ...string) {
	g.printf("# %s\n", f.Name)
	for _, ref := range refs {
		if len(f.Values) > 1 && allExact(f) {
			g.printf("%s if %s\n", name, exactSetExpr(ref, f))
			continue
		}
		for _, v := range f.Values {
			g.printf("%s if %s\n", name, valueExpr(ref, f, v))
		}
	}
	g.printf("\n")
}

// istioPeerField turns a namespaces or serviceAccounts field into the
// regular expressions Istio matches against the whole SPIFFE ID.
func istioPeerField(f policy.Field) policy.Field {
	out := f
	out.Values = make([]policy.Value, len(f.Values))
	for i, v := range f.Values {
		re, _ := policy.IstioPeerRegexp(f.Attr, v)
		out.Values[i] = policy.Value{Kind: policy.Template, S: v.S, Regexp: "^(?:" + re + ")$"}
	}
	return out
}

// NormalizedHostKey is the input key of the host without a :port and one
// trailing dot.
const NormalizedHostKey = "request.host.normalized"

// hostField matches hosts and notHosts. An ALLOW `hosts` is Istio's
// matcher exactly, on the host as sent. Everywhere else the host is also
// tried normalized (NormalizedHostKey), so that a port or a trailing dot
// never slips past a rule, since ext_authz may sit behind an Envoy that
// did not normalize it: a DENY, AUDIT or CUSTOM field matches if it
// matches either form, an ALLOW notHosts only if neither form is listed.
func (g *gen) hostField(name string, f policy.Field, a policy.Action) []string {
	raw, norm := attrRef(f), "input["+quote(NormalizedHostKey)+"]"
	comment := " # " + f.Name
	switch {
	case a == policy.Allow && !f.Not:
		return []string{g.fieldExpr(name, raw, f) + comment}
	case a == policy.Allow:
		g.helper(name, f, raw, norm)
		return []string{"not " + name + comment}
	case !f.Not:
		g.helper(name, f, raw, norm)
		return []string{name + comment}
	}
	g.helper(name+"_raw", f, raw)
	g.helper(name+"_norm", f, norm)
	g.printf("%s if not %s_raw\n%s if not %s_norm\n\n", name, name, name, name)
	return []string{name + comment}
}

func allExact(f policy.Field) bool {
	for _, v := range f.Values {
		if v.Kind != policy.Exact {
			return false
		}
	}
	return true
}

func exactSetExpr(ref string, f policy.Field) string {
	lits := make([]string, len(f.Values))
	for i, v := range f.Values {
		lits[i] = quote(v.S)
	}
	return ref + " in {" + strings.Join(lits, ", ") + "}"
}

// InputKey is the input key of a field's attribute.
func InputKey(f policy.Field) string {
	if f.Attr == policy.Header {
		return "request.headers[" + f.HeaderName + "]"
	}
	return f.Attr.String()
}

func attrRef(f policy.Field) string {
	return "input[" + quote(InputKey(f)) + "]"
}

func valueExpr(ref string, f policy.Field, v policy.Value) string {
	switch v.Kind {
	case policy.Presence:
		if f.Attr == policy.Header || f.Attr == policy.Host {
			// As Envoy's present_match, which Istio uses for headers: the
			// header is there, even if empty.
			return "is_string(" + ref + ")"
		}
		return ref + ` != ""`
	case policy.Exact:
		return ref + " == " + quote(v.S)
	case policy.Prefix:
		return "startswith(" + ref + ", " + quote(v.S) + ")"
	case policy.Suffix:
		return "endswith(" + ref + ", " + quote(v.S) + ")"
	case policy.Template:
		return "regex.match(" + quote(v.Regexp) + ", " + ref + ")"
	case policy.CIDR:
		return "net.cidr_contains(" + quote(v.Prefix.String()) + ", " + ref + ")"
	case policy.Port:
		return ref + " == " + strconv.Itoa(v.Port)
	}
	panic(fmt.Sprintf("rego: unknown value kind %v", v.Kind))
}

// quote returns a Rego string literal; JSON strings are valid Rego strings.
func quote(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}
