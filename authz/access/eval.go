package access

import (
	"net/netip"
	"sort"
	"strconv"
	"strings"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/symbolic"
	"github.com/trustmesh/trustmesh/mesh"
)

// The protocols of a check, as symbolic reads them.
const (
	http = symbolic.HTTP
	tcp  = symbolic.TCP
)

// evaluator decides pairs against one policy set, compiling each rule once
// per protocol.
type evaluator struct {
	root     string
	ps       []*policy.Policy
	compiled map[ruleKey]symbolic.Rule
	// uses are the attributes each policy reads, and matches the
	// classifications made so far, keyed by only the facts the policy
	// reads: most policies read neither the port nor the address, many
	// not the peer.
	uses    []map[policy.Attribute]bool
	matches map[matchKey]policyMatch
	// outcomes are the pairs decided so far; the destination address is
	// part of the key only when some policy reads it.
	outcomes map[outcomeKey]outcome
	readsIP  bool
	// redact, when set, redacts the values conditions quote.
	redact *decisionlog.Redactor
}

type outcomeKey struct {
	id, namespace, labels, ip string
	port                      uint32
	proto                     symbolic.Proto
}

type matchKey struct {
	policy    int
	proto     symbolic.Proto
	principal string
	port      uint32
	ip        string
}

type ruleKey struct {
	policy, rule int
	proto        symbolic.Proto
}

func newEvaluator(ps []*policy.Policy, root string) *evaluator {
	ev := &evaluator{root: root, ps: ps, compiled: map[ruleKey]symbolic.Rule{}, matches: map[matchKey]policyMatch{}, outcomes: map[outcomeKey]outcome{}}
	for _, p := range ps {
		uses := map[policy.Attribute]bool{}
		for _, r := range p.Rules {
			r.EachField(func(f policy.Field) { uses[f.Attr] = true })
		}
		ev.uses = append(ev.uses, uses)
		ev.readsIP = ev.readsIP || uses[policy.DestinationIP]
	}
	return ev
}

// cachedEval is eval, remembered by what it depends on.
func (ev *evaluator) cachedEval(id string, w *mesh.Workload, addr string, port uint32, proto symbolic.Proto) outcome {
	keys := make([]string, 0, len(w.Labels))
	for k := range w.Labels {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(strconv.Quote(k) + "=" + strconv.Quote(w.Labels[k]) + ",")
	}
	k := outcomeKey{id: id, namespace: w.ID.String(), labels: b.String(), port: port, proto: proto}
	if ev.readsIP {
		k.ip = addr
	}
	o, ok := ev.outcomes[k]
	if !ok {
		o = ev.eval(id, w, addr, port, proto)
		ev.outcomes[k] = o
	}
	return o
}

// cachedMatch is match, remembered by the facts policy pi reads.
func (ev *evaluator) cachedMatch(pi int, f symbolic.Conj, proto symbolic.Proto, src engine.Identity, port uint32, ip string) policyMatch {
	k := matchKey{policy: pi, proto: proto}
	u := ev.uses[pi]
	if u[policy.SourcePrincipal] || u[policy.SourceNamespace] || u[policy.SourceServiceAccount] || u[policy.SourceTrustDomain] {
		k.principal = src.Principal
	}
	if u[policy.DestinationPort] {
		k.port = port
	}
	if u[policy.DestinationIP] {
		k.ip = ip
	}
	pm, ok := ev.matches[k]
	if !ok {
		pm = ev.match(pi, f, proto)
		ev.matches[k] = pm
	}
	return pm
}

func (ev *evaluator) rule(pi, ri int, proto symbolic.Proto) symbolic.Rule {
	k := ruleKey{pi, ri, proto}
	r, ok := ev.compiled[k]
	if !ok {
		p := ev.ps[pi]
		r = symbolic.Compile(p.Action, p.Rules[ri], proto)
		ev.compiled[k] = r
	}
	return r
}

// outcome is the answer for one caller identity at one destination
// workload and port.
type outcome struct {
	verdict Verdict
	policy  string
	rule    *int
	reason  string
	conds   []string
}

// describe says why a non-conditional outcome is what it is.
func (o outcome) describe() string {
	if o.policy == "" {
		return o.reason
	}
	return o.reason + ": " + o.policy + " rule " + strconv.Itoa(*o.rule)
}

// policyMatch is what one policy's rules do for the pair: always is the
// lowest rule proved to match every request (-1 if none), maybe the rules
// that may match some, each with its condition in words.
type policyMatch struct {
	always int
	maybe  []ruleCond
}

type ruleCond struct {
	rule int
	when string
}

// facts are the literals every request of the pair satisfies.
func facts(src engine.Identity, destIP string, port uint32) symbolic.Conj {
	lit := func(a policy.Attribute, p symbolic.Pattern) symbolic.Literal {
		return symbolic.Literal{Key: symbolic.Key{Attr: a}, Op: symbolic.In, Patterns: []symbolic.Pattern{p}}
	}
	exact := func(s string) symbolic.Pattern { return symbolic.Pattern{Kind: symbolic.Exact, S: s} }
	c := symbolic.Conj{
		lit(policy.SourcePrincipal, exact(src.Principal)),
		lit(policy.SourceTrustDomain, exact(src.TrustDomain)),
		lit(policy.DestinationPort, symbolic.Pattern{Kind: symbolic.Port, Port: int(port)}),
	}
	if src.Namespace != "" {
		c = append(c,
			lit(policy.SourceNamespace, exact(src.Namespace)),
			lit(policy.SourceServiceAccount, exact(src.Namespace+"/"+src.ServiceAccount)))
	}
	if ip, err := netip.ParseAddr(destIP); err == nil && ip.Zone() == "" {
		ip = ip.Unmap()
		c = append(c, lit(policy.DestinationIP, symbolic.Pattern{Kind: symbolic.CIDR, Prefix: netip.PrefixFrom(ip, ip.BitLen())}))
	}
	return c
}

// match classifies the rules of policy pi for the facts.
func (ev *evaluator) match(pi int, f symbolic.Conj, proto symbolic.Proto) policyMatch {
	pm := policyMatch{always: -1}
	p := ev.ps[pi]
	for ri := range p.Rules {
		r := ev.rule(pi, ri, proto)
		if r.TooBig {
			pm.maybe = append(pm.maybe, ruleCond{ri, "the rule is too large to analyse"})
			continue
		}
		var alts []string
		for _, c := range r.Conjs {
			full := append(f[:len(f):len(f)], c...)
			if !full.Satisfiable() {
				continue
			}
			if f.ImpliesAll(c) {
				pm.always = ri
				return pm
			}
			var words []string
			for _, l := range c {
				if !f.Implies(l) {
					words = appendNew(words, literalWords(l, ev.redact))
				}
			}
			alts = appendNew(alts, strings.Join(words, " and "))
		}
		if len(alts) > 0 {
			pm.maybe = append(pm.maybe, ruleCond{ri, strings.Join(alts, ", or ")})
		}
	}
	return pm
}

// eval decides the requests from the identity id to workload w, listening
// on addr:port, as the engine would.
func (ev *evaluator) eval(id string, w *mesh.Workload, addr string, port uint32, proto symbolic.Proto) outcome {
	src, ok := engine.ParseIdentity(id)
	if !ok {
		return outcome{verdict: Denied, reason: ReasonPeerRejected}
	}
	dest, ok := engine.ParseIdentity(w.ID.String())
	if !ok || dest.Namespace == "" {
		return outcome{verdict: Denied, reason: "destination identity has no namespace"}
	}
	f := facts(src, addr, port)
	var (
		conds      []string
		first      *outcome // the first policy that may decide
		custom     bool
		allowRefs  []string
		allowed    *outcome
		allowConds []string
		firstAllow *outcome // the first ALLOW rule that may match
	)
	mayDecide := func(p *policy.Policy, rule int, reason string) {
		if first == nil {
			r := rule
			first = &outcome{policy: p.Key(), rule: &r, reason: reason}
		}
	}
	for pi, p := range ev.ps {
		if !applies(p, ev.root, dest.Namespace, w.Labels) || p.DryRun || p.Action == policy.Audit {
			continue
		}
		switch p.Action {
		case policy.Custom:
			pm := ev.cachedMatch(pi, f, proto, src, port, addr)
			switch {
			case pm.always >= 0:
				custom = true
				mayDecide(p, pm.always, ReasonCustom)
				conds = append(conds, "the external authorizer "+strconv.Quote(p.Provider)+" (CUSTOM "+p.Key()+" rule "+strconv.Itoa(pm.always)+") decides every request")
			case len(pm.maybe) > 0:
				custom = true
				mayDecide(p, pm.maybe[0].rule, ReasonCustom)
				for _, m := range pm.maybe {
					conds = append(conds, "the external authorizer "+strconv.Quote(p.Provider)+" (CUSTOM "+p.Key()+" rule "+strconv.Itoa(m.rule)+") decides when "+m.when)
				}
			}
		case policy.Deny:
			pm := ev.cachedMatch(pi, f, proto, src, port, addr)
			if pm.always >= 0 {
				r := pm.always
				return outcome{verdict: Denied, policy: p.Key(), rule: &r, reason: ReasonDenyMatches, conds: []string{}}
			}
			for _, m := range pm.maybe {
				mayDecide(p, m.rule, ReasonDepends)
				conds = append(conds, "denied by DENY "+p.Key()+" rule "+strconv.Itoa(m.rule)+" when "+m.when)
			}
		case policy.Allow:
			allowRefs = append(allowRefs, p.Key())
			if allowed != nil {
				continue
			}
			pm := ev.cachedMatch(pi, f, proto, src, port, addr)
			if pm.always >= 0 {
				r := pm.always
				allowed = &outcome{verdict: Allowed, policy: p.Key(), rule: &r, reason: ReasonAllowMatches}
				continue
			}
			for _, m := range pm.maybe {
				allowConds = append(allowConds, "allowed by ALLOW "+p.Key()+" rule "+strconv.Itoa(m.rule)+" when "+m.when)
				if firstAllow == nil {
					r := m.rule
					firstAllow = &outcome{policy: p.Key(), rule: &r}
				}
			}
		}
	}
	var base outcome
	switch {
	case len(allowRefs) == 0:
		base = outcome{verdict: Allowed, reason: ReasonNoAllowPolicy}
	case allowed != nil:
		base = *allowed
	case len(allowConds) == 0:
		return outcome{verdict: Denied, reason: ReasonNoAllowMatches + " (ALLOW policies: " + strings.Join(allowRefs, ", ") + ")", conds: []string{}}
	default:
		base = outcome{verdict: Conditional}
		conds = append(conds, allowConds...)
		if first == nil {
			first = firstAllow
		}
		conds = append(conds, "denied otherwise: no ALLOW rule matches (ALLOW policies: "+strings.Join(allowRefs, ", ")+")")
	}
	if len(conds) == 0 {
		base.conds = []string{}
		return base
	}
	if base.verdict == Allowed {
		conds = append(conds, "allowed otherwise: "+base.describe())
	}
	out := outcome{verdict: Conditional, reason: ReasonDepends, conds: conds}
	if custom {
		out.reason = ReasonCustom
	}
	if first != nil {
		out.policy, out.rule = first.policy, first.rule
	}
	return out
}

// applies reports whether p applies to a workload of namespace ns with
// labels, as the engine selects policies (policy.Applicable).
func applies(p *policy.Policy, root, ns string, labels map[string]string) bool {
	return len(policy.Applicable([]*policy.Policy{p}, root, ns, labels)) == 1
}
