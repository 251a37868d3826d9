package symbolic_test

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"slices"
	"sort"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/protobuf/proto"

	"github.com/trustmesh/trustmesh/authz/conformance"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/symbolic"
)

const (
	corpusFile = "../testdata/istio-oracle/corpus-seed1.jsonl.gz"
	root       = "istio-system"
	proofLabel = "trustmesh.test/proof"
)

// TestProofsHoldInTheEngine holds every proof the analysis makes to the
// engine: over the rules of the differential corpus (which the engine is
// checked against Istio's compiler on) and many rules generated from its
// value pools, each NeverMatches proof and each Covers proof is checked
// against every request of the corpus with engine.Set.Check:
//
//   - a rule proved never to match, alone in an ALLOW policy, never allows;
//     alone in a DENY policy, never denies;
//   - a DENY rule proved to cover an ALLOW rule, in a DENY and an ALLOW
//     policy of the same scope, never lets the ALLOW decide.
func TestProofsHoldInTheEngine(t *testing.T) {
	cases, err := conformance.ReadFile(corpusFile)
	if err != nil {
		t.Fatal(err)
	}
	rules, pools := corpusRules(t, cases)
	// Principals of SPIFFE IDs longer than .../ns/NS/sa/SA, which have
	// no source.namespace but match Istio's regexps: in rules and peers.
	k := poolKey{attr: policy.SourcePrincipal}
	for _, v := range slices.Clone(pools[k]) {
		if v.Kind == policy.Exact && strings.Count(v.S, "/") == 4 {
			pools[k] = append(pools[k], policy.Value{Kind: policy.Exact, S: v.S + "/ns/web/sa/extra"})
		}
	}
	reqs := corpusRequests(cases)
	t.Logf("corpus: %d cases, %d distinct rules, %d distinct requests, %d value pools", len(cases), len(rules), len(reqs), len(pools))

	g := &gen{r: rand.New(rand.NewPCG(1, 17)), pools: pools}
	var dead []deadProof
	var covers []coverProof
	addDead := func(r policy.Rule) {
		for _, a := range []policy.Action{policy.Allow, policy.Deny} {
			if symbolic.NeverMatches(a, r) {
				dead = append(dead, deadProof{a, r})
			}
		}
	}
	for _, r := range rules {
		addDead(r)
	}
	for range 6000 {
		addDead(g.deadCandidate())
	}
	addCover := func(d, a policy.Rule) {
		if symbolic.Covers(policy.Deny, d, policy.Allow, a) {
			covers = append(covers, coverProof{[]policy.Rule{d}, a})
		}
	}
	for range 20000 {
		addCover(rules[g.r.IntN(len(rules))], rules[g.r.IntN(len(rules))])
	}
	for range 6000 {
		a := g.rule()
		if g.r.IntN(4) == 0 {
			a = rules[g.r.IntN(len(rules))]
		}
		addCover(g.widen(a), a)
	}
	// DENY rules that decide together: one per value of an ALLOW field,
	// each widened, through Deciding as TMA011 calls it.
	together := 0
	for range 4000 {
		a := g.rule()
		if g.r.IntN(4) == 0 {
			a = rules[g.r.IntN(len(rules))]
		}
		ds := g.split(a)
		if ds == nil {
			continue
		}
		deny := &policy.Policy{Namespace: root, Name: "deny", Action: policy.Deny, Rules: ds}
		allow := &policy.Policy{Namespace: root, Name: "allow", Action: policy.Allow, Rules: []policy.Rule{a}}
		refs := symbolic.Deciding([]*policy.Policy{deny}, allow, 0, root)
		if len(refs) < 2 {
			continue
		}
		var rs []policy.Rule
		for _, r := range refs {
			rs = append(rs, r.Policy.Rules[r.Rule])
		}
		covers = append(covers, coverProof{rs, a})
		together++
	}
	t.Logf("proofs: %d NeverMatches, %d Covers (%d by DENY rules together)", len(dead), len(covers), together)
	// The corpus and the generators are fixed: these floors only catch an
	// analysis that stopped proving anything.
	if len(dead) < 200 || len(covers) < 200 {
		t.Fatalf("too few proofs to test (%d NeverMatches, %d Covers): the analysis or the generators broke", len(dead), len(covers))
	}

	// Every proof is checked against the same requests: sample the proofs
	// (the generators make many alike) to keep the test under a minute.
	// Proofs that tie an exact principal to the peer's other fields are
	// rarer: a quarter of the sample, where there are that many.
	dead = sampleFavouring(g.r, dead, maxChecked, func(d deadProof) bool { return peerTied(d.rule) })
	covers = sampleFavouring(g.r, covers, maxChecked, func(c coverProof) bool {
		all := c.allow
		for _, d := range c.deny {
			all = policy.Rule{From: slices.Concat(all.From, d.From), To: slices.Concat(all.To, d.To), When: slices.Concat(all.When, d.When)}
		}
		return len(c.deny) > 1 || peerTied(all)
	})

	// Under the race detector, which finds nothing in this one goroutine's
	// computation, every tenth proof: make test runs them all without it.
	if raceEnabled {
		dead, covers = everyNth(dead, raceStride), everyNth(covers, raceStride)
		t.Logf("race detector on: checking every %dth proof only (%d NeverMatches, %d Covers); run without -race for all", raceStride, len(dead), len(covers))
	}

	// Each proof gets its own selector value; a request is checked once
	// per proof, with the destination labelled for it.
	var checks []check
	for i, d := range dead {
		sel := map[string]string{proofLabel: fmt.Sprint(len(checks))}
		c := check{what: fmt.Sprintf("NeverMatches(%s, %s)", d.action, ruleString(d.rule)),
			policies: []*policy.Policy{{Namespace: root, Name: fmt.Sprintf("dead-%d", i), Action: d.action, Selector: sel, Rules: []policy.Rule{d.rule}}}}
		// The rule alone in its policy never decides.
		c.wrong = engine.ReasonAllowMatched
		if d.action == policy.Deny {
			c.wrong = engine.ReasonDenyMatched
		}
		checks = append(checks, c)
	}
	for i, cv := range covers {
		sel := map[string]string{proofLabel: fmt.Sprint(len(checks))}
		checks = append(checks, check{what: fmt.Sprintf("Covers(DENY %s, ALLOW %s)", rulesString(cv.deny), ruleString(cv.allow)),
			policies: []*policy.Policy{
				{Namespace: root, Name: fmt.Sprintf("cover-%d-deny", i), Action: policy.Deny, Selector: sel, Rules: cv.deny},
				{Namespace: root, Name: fmt.Sprintf("cover-%d-allow", i), Action: policy.Allow, Selector: sel, Rules: []policy.Rule{cv.allow}},
			},
			// The ALLOW never decides: whatever it matches, the DENY does.
			wrong: engine.ReasonAllowMatched, witness: engine.ReasonDenyMatched,
		})
	}
	n := min(len(reqs), maxRequests)
	if testing.Short() {
		n = min(n, 100)
	}
	reqs = append(sample(g.r, reqs, n), g.oddPeers(reqs, 100)...)
	var failures []string
	denied := 0 // checks of Covers proofs that the DENY decided
	// The engine's evaluation grows with the set: a few proofs per set.
	for lo := 0; lo < len(checks); lo += 25 {
		batch := checks[lo:min(lo+25, len(checks))]
		var ps []*policy.Policy
		for _, c := range batch {
			ps = append(ps, c.policies...)
		}
		set, err := engine.Build(context.Background(), engine.SetConfig{
			RootNamespace: root, Policies: ps, Gateways: engine.NewGatewayIDs(conformance.GatewayIdentities...),
		})
		if err != nil {
			t.Fatal(err)
		}
		for i, c := range batch {
			for _, req := range reqs {
				d, err := set.Check(context.Background(), labelled(req, fmt.Sprint(lo+i)))
				if err != nil {
					t.Fatalf("%s: %v", c.what, err)
				}
				if c.witness != "" && d.Reason == c.witness {
					denied++
				}
				if d.Reason != c.wrong {
					continue
				}
				t.Fail()
				if len(failures) < 10 {
					failures = append(failures, fmt.Sprintf("%s is wrong: the engine says %s (%s rule %v) for %s", c.what, d.Reason, d.Policy, ruleIndex(d.Rule), reqJSON(req)))
				}
				break // one request per wrong proof
			}
		}
	}
	t.Logf("%d proofs checked against %d requests each; the DENY of a Covers proof decided %d checks", len(checks), len(reqs), denied)
	for _, f := range failures {
		t.Error(f)
	}
}

// check is one proof as policies and the reason the engine must never
// give for them.
type check struct {
	what     string
	policies []*policy.Policy
	wrong    string
	witness  string // a reason that shows the proof's rules at work
}

// labelled returns req with the destination carrying the proof's label.
func labelled(req *authv3.CheckRequest, proof string) *authv3.CheckRequest {
	out := proto.Clone(req).(*authv3.CheckRequest)
	dest := out.GetAttributes().GetDestination()
	dest.Labels = map[string]string{proofLabel: proof}
	for k, v := range req.GetAttributes().GetDestination().GetLabels() {
		dest.Labels[k] = v
	}
	return out
}

// The proofs checked of each kind, and the requests each is checked
// against.
const (
	maxChecked  = 200
	maxRequests = 400
)

// raceStride is the stride of the sample checked under the race detector.
const raceStride = 10

// everyNth returns xs[0], xs[n], xs[2n], ...
func everyNth[T any](xs []T, n int) []T {
	var out []T
	for i := 0; i < len(xs); i += n {
		out = append(out, xs[i])
	}
	return out
}

// sample returns n elements of xs, chosen at random, in their order.
func sample[T any](r *rand.Rand, xs []T, n int) []T {
	if len(xs) <= n {
		return xs
	}
	idx := r.Perm(len(xs))[:n]
	sort.Ints(idx)
	out := make([]T, n)
	for i, j := range idx {
		out[i] = xs[j]
	}
	return out
}

func ruleIndex(r *int) any {
	if r == nil {
		return "-"
	}
	return *r
}

type deadProof struct {
	action policy.Action
	rule   policy.Rule
}

// coverProof is DENY rules that cover an ALLOW rule: each request it
// matches, one of them matches.
type coverProof struct {
	deny  []policy.Rule
	allow policy.Rule
}

// poolKey is an attribute (and header) whose values the corpus uses.
type poolKey struct {
	attr   policy.Attribute
	header string
}

// corpusRules returns the distinct rules of the corpus's policies and the
// values each attribute takes in them.
func corpusRules(t *testing.T, cases []conformance.Case) ([]policy.Rule, map[poolKey][]policy.Value) {
	seen := map[string]bool{}
	seenRule := map[string]bool{}
	seenValue := map[string]bool{}
	var rules []policy.Rule
	pools := map[poolKey][]policy.Value{}
	for _, c := range cases {
		if seen[string(c.Policies)] {
			continue
		}
		seen[string(c.Policies)] = true
		var objs []json.RawMessage
		if err := json.Unmarshal(c.Policies, &objs); err != nil {
			t.Fatal(err)
		}
		docs := make([]string, len(objs))
		for i, o := range objs {
			docs[i] = string(o)
		}
		ps, err := policy.ParseYAML("corpus", []byte(strings.Join(docs, "\n---\n")), "default")
		if err != nil {
			t.Fatalf("case %d: %v", c.N, err)
		}
		for _, p := range ps {
			for _, r := range p.Rules {
				if k := ruleJSON(r); !seenRule[k] {
					seenRule[k] = true
					rules = append(rules, r)
				}
				r.EachField(func(f policy.Field) {
					k := poolKey{f.Attr, f.HeaderName}
					for _, v := range f.Values {
						id := fmt.Sprintf("%v|%s|%v", k, v.S, v.Kind)
						if !seenValue[id] {
							seenValue[id] = true
							pools[k] = append(pools[k], v)
						}
					}
				})
			}
		}
	}
	return rules, pools
}

// corpusRequests returns the distinct requests of the corpus as the
// destination's Envoy sends them to ext_authz.
func corpusRequests(cases []conformance.Case) []*authv3.CheckRequest {
	seen := map[string]bool{}
	var out []*authv3.CheckRequest
	for _, c := range cases {
		k := reqJSON(c.Request)
		if seen[k] {
			continue
		}
		seen[k] = true
		out = append(out, checkRequest(&c.Request))
	}
	return out
}

// checkRequest is the CheckRequest for a corpus request, as the
// conformance test builds it (authz/conformance).
func checkRequest(r *conformance.Request) *authv3.CheckRequest {
	a := &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: r.Principal, Address: address(r.PeerIP, 40000)},
		Destination: &authv3.AttributeContext_Peer{
			Principal: "spiffe://cluster.local/ns/" + r.Dest.Namespace + "/sa/" + r.Dest.ServiceAccount,
			Labels:    r.Dest.Labels,
			Address:   address(r.Dest.IP, r.Dest.Port),
		},
	}
	if r.SNI != "" {
		a.TlsSession = &authv3.AttributeContext_TLSSession{Sni: r.SNI}
	}
	if !r.TCP {
		h := map[string]string{":authority": r.Host, ":method": r.Method, ":path": r.Path}
		for k, v := range r.Headers {
			h[strings.ToLower(k)] = v
		}
		switch {
		case r.Listener == conformance.Gateway && r.Forwarded == "":
			h[engine.ExternalAddressHeader] = r.PeerIP
		case r.Forwarded != "":
			h[engine.ExternalAddressHeader] = r.Forwarded
		}
		a.Request = &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: r.Method, Host: r.Host, Path: r.Path, Headers: h, Protocol: "HTTP/1.1",
		}}
	}
	return &authv3.CheckRequest{Attributes: a}
}

func address(ip string, port uint32) *corev3.Address {
	return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
		Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port},
	}}}
}

func ruleJSON(r policy.Rule) string {
	b, err := json.Marshal(r)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

func reqJSON(v any) string {
	b, err := json.Marshal(v)
	if err != nil {
		return err.Error()
	}
	return string(b)
}

// gen makes rules from the corpus's value pools.
type gen struct {
	r     *rand.Rand
	pools map[poolKey][]policy.Value
	keys  []poolKey
}

func (g *gen) key() poolKey {
	if g.keys == nil {
		for k := range g.pools {
			g.keys = append(g.keys, k)
		}
		sort.Slice(g.keys, func(i, j int) bool {
			if g.keys[i].attr != g.keys[j].attr {
				return g.keys[i].attr < g.keys[j].attr
			}
			return g.keys[i].header < g.keys[j].header
		})
	}
	return g.keys[g.r.IntN(len(g.keys))]
}

func (g *gen) values(k poolKey, n int) []policy.Value {
	pool := g.pools[k]
	out := make([]policy.Value, 0, n)
	for range n {
		out = append(out, pool[g.r.IntN(len(pool))])
	}
	return out
}

func (g *gen) field(k poolKey, not bool, vals []policy.Value) policy.Field {
	return policy.Field{Name: "gen", Attr: k.attr, HeaderName: k.header, Not: not, Values: vals}
}

func (g *gen) randomField() policy.Field {
	k := g.key()
	return g.field(k, g.r.IntN(3) == 0, g.values(k, 1+g.r.IntN(3)))
}

// rule returns a random rule: up to two sources and operations of one or
// two fields, and up to two conditions.
func (g *gen) rule() policy.Rule {
	var r policy.Rule
	matches := func() []policy.Match {
		var ms []policy.Match
		for range g.r.IntN(3) {
			m := policy.Match{g.randomField()}
			if g.r.IntN(2) == 0 {
				m = append(m, g.randomField())
			}
			ms = append(ms, m)
		}
		return ms
	}
	r.From, r.To = matches(), matches()
	for range g.r.IntN(3) {
		r.When = append(r.When, g.randomField())
	}
	return r
}

// deadCandidate returns a random rule with a field and a negated field on
// the same attribute whose values overlap, often entirely, or two fields
// on the same attribute.
func (g *gen) deadCandidate() policy.Rule {
	r := g.rule()
	k := g.key()
	vals := g.values(k, 1+g.r.IntN(2))
	negs := append([]policy.Value(nil), vals...)
	if g.r.IntN(3) == 0 {
		negs = append(negs, g.values(k, 1)...)
	}
	if g.r.IntN(4) == 0 {
		negs = g.values(k, 1+g.r.IntN(3))
	}
	pos, neg := g.field(k, false, vals), g.field(k, true, negs)
	if g.r.IntN(2) == 0 {
		// Two value sets on one attribute that may exclude each other.
		neg = g.field(k, false, g.values(k, 1+g.r.IntN(2)))
	}
	for _, f := range []policy.Field{pos, neg} {
		switch g.r.IntN(3) {
		case 0:
			r.From = append(r.From, nil)
			r.From[len(r.From)-1] = policy.Match{f}
			if len(r.From) > 1 {
				// Into every source, so that no source escapes.
				for i := range r.From {
					r.From[i] = append(r.From[i], f)
				}
			}
		case 1:
			for i := range r.To {
				r.To[i] = append(r.To[i], f)
			}
			if len(r.To) == 0 {
				r.To = []policy.Match{{f}}
			}
		default:
			r.When = append(r.When, f)
		}
	}
	return r
}

// widen returns a rule that matches at least what r matches, mostly: it
// drops fields, adds values, turns exact values into prefixes or suffixes
// of themselves and drops negated values; sometimes it adds a field, so
// that not every candidate holds.
func (g *gen) widen(r policy.Rule) policy.Rule {
	cp := func(ms []policy.Match) []policy.Match {
		var out []policy.Match
		for _, m := range ms {
			out = append(out, append(policy.Match(nil), m...))
		}
		return out
	}
	w := policy.Rule{From: cp(r.From), To: cp(r.To), When: append([]policy.Field(nil), r.When...)}
	mutate := func(f policy.Field) (policy.Field, bool) {
		f.Values = append([]policy.Value(nil), f.Values...)
		switch g.r.IntN(5) {
		case 0:
			return f, false // drop it
		case 1:
			f.Values = append(f.Values, g.values(poolKey{f.Attr, f.HeaderName}, 1)...)
			if f.Not {
				f.Values = f.Values[:len(f.Values)-1]
				if len(f.Values) > 1 {
					f.Values = f.Values[1:]
				}
			}
		case 2:
			if !stringPatterns(f.Attr) {
				break
			}
			for i, v := range f.Values {
				if v.Kind == policy.Exact && len(v.S) > 1 {
					cut := 1 + g.r.IntN(len(v.S)-1)
					if g.r.IntN(2) == 0 {
						f.Values[i] = policy.Value{Kind: policy.Prefix, S: v.S[:cut]}
					} else {
						f.Values[i] = policy.Value{Kind: policy.Suffix, S: v.S[cut:]}
					}
				}
			}
		case 3:
			if stringPatterns(f.Attr) {
				f.Values = []policy.Value{{Kind: policy.Presence}}
			}
		}
		return f, true
	}
	edit := func(fs []policy.Field) []policy.Field {
		var out []policy.Field
		for _, f := range fs {
			if g.r.IntN(2) == 0 {
				out = append(out, f)
				continue
			}
			if f2, keep := mutate(f); keep {
				out = append(out, f2)
			}
		}
		return out
	}
	for i := range w.From {
		w.From[i] = edit(w.From[i])
	}
	for i := range w.To {
		w.To[i] = edit(w.To[i])
	}
	w.When = edit(w.When)
	// A source or operation left empty would be refused by the parser;
	// the engine takes it as matching anything, which is the widening.
	switch g.r.IntN(6) {
	case 0:
		w.From = nil
	case 1:
		w.To = nil
	case 2:
		w.When = append(w.When, g.randomField())
	}
	return w
}

// stringPatterns reports whether the parser gives the attribute prefix,
// suffix and presence values: the generators make only values it could.
func stringPatterns(a policy.Attribute) bool {
	switch a {
	case policy.SourceServiceAccount, policy.SourceIP, policy.RemoteIP, policy.DestinationIP, policy.DestinationPort:
		return false
	}
	return true
}

// ruleString shows a rule compactly: sources, operations and conditions,
// each field as attribute, "!" if negated, and its values.
func ruleString(r policy.Rule) string {
	field := func(f policy.Field) string {
		var vs []string
		for _, v := range f.Values {
			switch v.Kind {
			case policy.Prefix:
				vs = append(vs, v.S+"*")
			case policy.Suffix:
				vs = append(vs, "*"+v.S)
			case policy.Presence:
				vs = append(vs, "*")
			case policy.CIDR:
				vs = append(vs, v.Prefix.String())
			default:
				vs = append(vs, v.S)
			}
		}
		name := f.Attr.String()
		if f.Attr == policy.Header {
			name = "request.headers[" + f.HeaderName + "]"
		}
		if f.Not {
			name = "!" + name
		}
		return name + fmt.Sprintf("%q", vs)
	}
	matches := func(ms []policy.Match) string {
		var out []string
		for _, m := range ms {
			var fs []string
			for _, f := range m {
				fs = append(fs, field(f))
			}
			out = append(out, "{"+strings.Join(fs, " ")+"}")
		}
		return "[" + strings.Join(out, " ") + "]"
	}
	var when []string
	for _, f := range r.When {
		when = append(when, field(f))
	}
	return "from " + matches(r.From) + " to " + matches(r.To) + " when [" + strings.Join(when, " ") + "]"
}

// oddPeers returns n requests of reqs whose peer has a SPIFFE ID that a
// certificate may carry but no corpus request does: two /ns/ and /sa/
// parts, from the corpus's own values, which Istio's regular expressions
// for namespaces and service accounts match both of.
func (g *gen) oddPeers(reqs []*authv3.CheckRequest, n int) []*authv3.CheckRequest {
	var ids []string
	for _, v := range g.pools[poolKey{attr: policy.SourcePrincipal}] {
		if v.Kind == policy.Exact {
			ids = append(ids, v.S)
		}
	}
	var sas []string
	for _, v := range g.pools[poolKey{attr: policy.SourceServiceAccount}] {
		sas = append(sas, v.S)
	}
	for _, v := range g.pools[poolKey{attr: policy.SourceNamespace}] {
		if v.Kind == policy.Exact {
			sas = append(sas, v.S+"/default")
		}
	}
	var out []*authv3.CheckRequest
	for len(out) < n && len(ids) > 0 && len(sas) > 0 {
		req := proto.Clone(reqs[g.r.IntN(len(reqs))]).(*authv3.CheckRequest)
		ns, sa, _ := strings.Cut(sas[g.r.IntN(len(sas))], "/")
		req.Attributes.Source.Principal = "spiffe://" + ids[g.r.IntN(len(ids))] + "/ns/" + ns + "/sa/" + sa
		out = append(out, req)
	}
	// Newlines, which Istio's regexps do not match across, in and around
	// the parts the engine parses: the engine must deny these unevaluated
	// for the proofs that tie the parsed namespace and account to the
	// regexps to hold.
	for i := 0; i < n/4 && len(sas) > 0; i++ {
		req := proto.Clone(reqs[g.r.IntN(len(reqs))]).(*authv3.CheckRequest)
		ns, sa, _ := strings.Cut(sas[g.r.IntN(len(sas))], "/")
		td := []string{"cluster.local", "cluster.\nlocal", "cluster.local\n", "\ncluster.local"}[i%4]
		if i%4 == 0 {
			ns += "\n"
		}
		req.Attributes.Source.Principal = "spiffe://" + td + "/ns/" + ns + "/sa/" + sa
		out = append(out, req)
	}
	return out
}

func rulesString(rs []policy.Rule) string {
	var out []string
	for _, r := range rs {
		out = append(out, ruleString(r))
	}
	return strings.Join(out, " | ")
}

// split returns, for a positive field of r with several values, one rule
// per value, r with the field held to that value and then widened; nil
// when r has no such field.
func (g *gen) split(r policy.Rule) []policy.Rule {
	type at struct{ part, match, field int } // part 0 from, 1 to, 2 when
	var spots []at
	for mi, m := range r.From {
		for fi, f := range m {
			if !f.Not && len(f.Values) > 1 {
				spots = append(spots, at{0, mi, fi})
			}
		}
	}
	for mi, m := range r.To {
		for fi, f := range m {
			if !f.Not && len(f.Values) > 1 {
				spots = append(spots, at{1, mi, fi})
			}
		}
	}
	for fi, f := range r.When {
		if !f.Not && len(f.Values) > 1 {
			spots = append(spots, at{2, 0, fi})
		}
	}
	if len(spots) == 0 {
		return nil
	}
	s := spots[g.r.IntN(len(spots))]
	var f policy.Field
	switch s.part {
	case 0:
		f = r.From[s.match][s.field]
	case 1:
		f = r.To[s.match][s.field]
	default:
		f = r.When[s.field]
	}
	var out []policy.Rule
	for _, v := range f.Values {
		one := f
		one.Values = []policy.Value{v}
		c := policy.Rule{From: slices.Clone(r.From), To: slices.Clone(r.To), When: slices.Clone(r.When)}
		switch s.part {
		case 0:
			c.From[s.match] = slices.Clone(c.From[s.match])
			c.From[s.match][s.field] = one
		case 1:
			c.To[s.match] = slices.Clone(c.To[s.match])
			c.To[s.match][s.field] = one
		default:
			c.When[s.field] = one
		}
		out = append(out, g.widen(c))
	}
	return out
}

// sampleFavouring samples n of xs, a quarter of them (as far as there are)
// among those that favoured holds for.
func sampleFavouring[T any](r *rand.Rand, xs []T, n int, favoured func(T) bool) []T {
	if len(xs) <= n {
		return xs
	}
	var fav, rest []T
	for _, x := range xs {
		if favoured(x) {
			fav = append(fav, x)
		} else {
			rest = append(rest, x)
		}
	}
	fav = sample(r, fav, n/4)
	return append(fav, sample(r, rest, n-len(fav))...)
}

// peerTied reports whether a rule names an exact principal and another
// peer field, which the analysis ties together (peer.go).
func peerTied(r policy.Rule) bool {
	exact, other := false, false
	r.EachField(func(f policy.Field) {
		if !f.Attr.NeedsPeer() {
			return
		}
		if f.Attr == policy.SourcePrincipal && !f.Not && !slices.ContainsFunc(f.Values, func(v policy.Value) bool { return v.Kind != policy.Exact }) {
			exact = true
			return
		}
		other = true
	})
	return exact && other
}
