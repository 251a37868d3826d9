package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strconv"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	oparego "github.com/open-policy-agent/opa/v1/rego"

	"github.com/trustmesh/trustmesh/authz/policy"
	authzrego "github.com/trustmesh/trustmesh/authz/rego"
)

// ErrExplanationDisagrees is returned, with no explanation, when the
// fields' outcomes do not add up to the rules the engine matched: an
// explanation that could contradict the decision is never shown.
var ErrExplanationDisagrees = errors.New("engine: the explanation disagrees with the evaluation")

// trace records how check decided one request, for Explain.
type trace struct {
	req        *request
	applicable []*entry
	// evaluated is set once the policies were evaluated; matched then
	// holds every matching rule of each policy, in no order.
	evaluated bool
	matched   map[string][]int
	// provider holds the answer of each CUSTOM policy's provider that was
	// asked.
	provider map[string]bool
}

// Explanation is how the engine decided one request: which policies
// applied and why, each rule's match or miss, and the decision, which is
// the one Check makes.
type Explanation struct {
	Destination Destination `json:"destination"`
	Request     Attributes  `json:"request"`
	Selection   Selection   `json:"selection"`
	// Evaluated is false when no rule was evaluated (no policy applies,
	// the path was rejected, or the request could not be read); Note
	// says why.
	Evaluated bool   `json:"evaluated"`
	Note      string `json:"note,omitempty"`
	// Policies are the policies that applied, in Istio's evaluation
	// order: CUSTOM, DENY, ALLOW, then AUDIT (which never decides).
	Policies []PolicyTrace `json:"policies"`
	Decision *Decision     `json:"decision"`
}

// Destination is the workload a request is for.
type Destination struct {
	Principal string            `json:"principal"`
	Namespace string            `json:"namespace,omitempty"`
	Labels    map[string]string `json:"labels,omitempty"`
}

// Attributes are the request's attributes as the policies see them: the
// path is normalized and without its query. Empty ones are absent.
type Attributes struct {
	Protocol        string `json:"protocol"`
	Principal       string `json:"source_principal,omitempty"`
	SourceIP        string `json:"source_ip,omitempty"`
	RemoteIP        string `json:"remote_ip,omitempty"`
	DestinationIP   string `json:"destination_ip,omitempty"`
	DestinationPort uint32 `json:"destination_port,omitempty"`
	SNI             string `json:"sni,omitempty"`
	Method          string `json:"method,omitempty"`
	Host            string `json:"host,omitempty"`
	Path            string `json:"path,omitempty"`
	// SentPath is the path as sent, without its query, when normalizing
	// changed it.
	SentPath string `json:"sent_path,omitempty"`
}

// Selection says how the policies were chosen: those of the root
// namespace and of the destination's namespace whose selector matches the
// destination's labels.
type Selection struct {
	RootNamespace string `json:"root_namespace"`
	// Namespaces are the namespaces whose policies were considered.
	Namespaces []string `json:"namespaces"`
	// NotSelected are the policies of those namespaces whose selector
	// does not match, each with the first label that differs.
	NotSelected []NotSelected `json:"not_selected,omitempty"`
}

// NotSelected is a policy its selector kept from applying.
type NotSelected struct {
	Policy string `json:"policy"`
	Why    string `json:"why"`
}

// PolicyTrace is one applicable policy.
type PolicyTrace struct {
	Policy   string            `json:"policy"`
	Origin   string            `json:"origin,omitempty"`
	Action   string            `json:"action"`
	Provider string            `json:"provider,omitempty"`
	DryRun   bool              `json:"dry_run,omitempty"`
	Selector map[string]string `json:"selector,omitempty"`
	// Matched is whether any rule matched; Rule is then the lowest, the
	// one a decision names.
	Matched bool `json:"matched"`
	Rule    *int `json:"rule,omitempty"`
	// ProviderAllowed is the answer of a CUSTOM policy's provider, if it
	// was asked (it is asked only when a rule matched, and not after
	// another provider denied).
	ProviderAllowed *bool `json:"provider_allowed,omitempty"`
	// Decides marks the policy that decided; ShadowDecides the one that
	// decided the dry-run (shadow) decision.
	Decides       bool        `json:"decides,omitempty"`
	ShadowDecides bool        `json:"shadow_decides,omitempty"`
	Rules         []RuleTrace `json:"rules"`
}

// RuleTrace is one rule's outcome.
type RuleTrace struct {
	Rule    int    `json:"rule"`
	Field   string `json:"field"` // spec.rules[N]
	Matched bool   `json:"matched"`
	// SkippedForTCP marks an ALLOW rule that uses HTTP-only fields: on a
	// TCP request it allows nothing, as in Istio.
	SkippedForTCP bool `json:"skipped_for_tcp,omitempty"`
	// DroppedForTCP are the HTTP-only fields a rule of another action did
	// without on a TCP request (it then matches more).
	DroppedForTCP []string `json:"dropped_for_tcp,omitempty"`
	// Misses are, for a rule that missed, the first failing field of its
	// first failing part (from, to or when): one per from or to entry,
	// since they are ORed.
	Misses []FieldMiss `json:"misses,omitempty"`
}

// FieldMiss is a field that did not match.
type FieldMiss struct {
	Field     string `json:"field"`     // spec.rules[1].to[0].operation.paths
	Attribute string `json:"attribute"` // request.path, request.headers[x-user]
	// Header is the header's name for a request.headers attribute.
	Header string `json:"header,omitempty"`
	// Value is the request's value as the rule saw it; nil when the
	// request lacks the attribute.
	Value *string `json:"value"`
	// Not marks a not* field (or notValues): it misses when a value
	// matches.
	Not    bool     `json:"not,omitempty"`
	Wanted []string `json:"wanted"`
	Note   string   `json:"note,omitempty"`
}

// Explainer explains requests against one Set. It compiles the Set's
// policies once more, with the rules that report each field's outcome
// (authzrego.ExplainModule); serving never pays for them. The decision it
// explains is the serving back end's (the native one by default), and the
// fields' outcomes, evaluated by the Rego back end's expressions, must add
// up to the rules that back end matched (else ErrExplanationDisagrees): an
// explanation is also a check of the two back ends against each other.
type Explainer struct {
	s      *Set
	fields oparego.PreparedEvalQuery
}

// Explainer prepares the explanation of requests against s.
func (s *Set) Explainer(ctx context.Context) (*Explainer, error) {
	mods := map[string]*ast.Module{}
	add := func(name, src string) error {
		m, err := ast.ParseModuleWithOpts(name, src, ast.ParserOptions{RegoVersion: ast.RegoV1})
		if err != nil {
			return fmt.Errorf("engine: generated %s: %w", name, err)
		}
		mods[name] = m
		return nil
	}
	for _, e := range s.entries {
		name := "policy/" + e.idStr + ".rego"
		src := authzrego.ExplainModule(e.idStr, e.policy)
		// The rules that decide are the served ones, to the byte.
		if served, ok := s.Modules()[name]; !ok || !strings.HasPrefix(src, served) {
			return nil, fmt.Errorf("%w: the explain module of %s does not start with the served %s", ErrExplanationDisagrees, e.policy.Key(), name)
		}
		if err := add(name, src); err != nil {
			return nil, err
		}
	}
	if err := add("explain.rego", authzrego.ExplainEntryModule()); err != nil {
		return nil, err
	}
	c := ast.NewCompiler()
	if c.Compile(mods); c.Failed() {
		return nil, fmt.Errorf("engine: compiling the explain Rego: %w", c.Errors)
	}
	pq, err := oparego.New(oparego.Compiler(c), oparego.Query(authzrego.ExplainQuery)).PrepareForEval(ctx)
	if err != nil {
		return nil, fmt.Errorf("engine: preparing %s: %w", authzrego.ExplainQuery, err)
	}
	return &Explainer{s: s, fields: pq}, nil
}

// Explain is Explainer(ctx) then Explain(ctx, req).
func (s *Set) Explain(ctx context.Context, req *authv3.CheckRequest) (*Explanation, error) {
	x, err := s.Explainer(ctx)
	if err != nil {
		return nil, err
	}
	return x.Explain(ctx, req)
}

// Explain decides req exactly as Check does, recording how, and explains
// each applicable rule from the outcome of its fields. The fields'
// outcomes come from the same generated expressions as the rules, over
// the same input; should they not add up to the rules the engine matched,
// Explain returns ErrExplanationDisagrees rather than a wrong story. An
// evaluation error is a decision (it denies), as in Check.
func (x *Explainer) Explain(ctx context.Context, req *authv3.CheckRequest) (*Explanation, error) {
	s := x.s
	tr := &trace{matched: map[string][]int{}, provider: map[string]bool{}}
	d := new(Decision)
	_ = s.run(ctx, req, tr, d) // the decision carries the error
	a := req.GetAttributes()
	ex := &Explanation{
		Destination: Destination{Principal: a.GetDestination().GetPrincipal(), Namespace: d.Dest.Namespace, Labels: d.Dest.Labels},
		Selection:   Selection{RootNamespace: s.root},
		Policies:    []PolicyTrace{},
		Decision:    d,
	}
	r := tr.req
	if r == nil || d.Dest.Namespace == "" {
		ex.Note = "no policy was evaluated: " + errNoDestination.Error()
		return ex, nil
	}
	ex.Request = attributes(r)
	ex.Selection.Namespaces, ex.Selection.NotSelected = s.selection(r.dest)
	switch {
	case r.peerErr != nil:
		ex.Note = "no policy was evaluated: the source principal is not a well-formed SPIFFE ID, so the request is denied"
		return ex, nil
	case r.http && r.pathErr != nil:
		ex.Note = "no policy was evaluated: the path was rejected by normalization"
		return ex, nil
	case d.Applied == 0:
		ex.Note = "no policy applies to the destination, so it is allowed"
		return ex, nil
	case !tr.evaluated:
		ex.Note = "no rule was evaluated: the evaluation failed"
		return ex, nil
	}
	ids := make([]*ast.Term, len(tr.applicable))
	for i, e := range tr.applicable {
		ids[i] = e.id
	}
	input := r.input(ids, s.used, s.headers)
	fields, err := x.evalFields(ctx, input)
	if err != nil {
		return nil, err
	}
	in, _ := input.(ast.Object)
	ex.Evaluated = true
	for _, e := range tr.applicable {
		pt, err := explainPolicy(e, r.http, fields[e.idStr], tr, in)
		if err != nil {
			return nil, err
		}
		if d.Policy == pt.Policy && d.Rule != nil {
			pt.Decides = true
		}
		if d.DryRun != nil && d.DryRun.Policy == pt.Policy {
			pt.ShadowDecides = true
		}
		ex.Policies = append(ex.Policies, pt)
	}
	// Istio's order; within an action, the set's order, as the engine.
	sort.SliceStable(ex.Policies, func(i, j int) bool {
		return actionOrder(ex.Policies[i].Action) < actionOrder(ex.Policies[j].Action)
	})
	return ex, nil
}

func actionOrder(a string) int {
	for _, x := range []policy.Action{policy.Custom, policy.Deny, policy.Allow, policy.Audit} {
		if x.String() == a {
			return int(x)
		}
	}
	return 99
}

// evalFields returns, per policy id, the names of its fields that match.
func (x *Explainer) evalFields(ctx context.Context, input ast.Value) (map[string]map[string]bool, error) {
	rs, err := x.fields.Eval(ctx, oparego.EvalParsedInput(input),
		oparego.EvalGenerateJSON(func(t *ast.Term, _ *oparego.EvalContext) (any, error) { return t, nil }))
	if err != nil {
		return nil, fmt.Errorf("engine: explaining: %w", err)
	}
	out := map[string]map[string]bool{}
	if len(rs) == 0 || len(rs[0].Expressions) == 0 {
		return out, nil
	}
	t, ok := rs[0].Expressions[0].Value.(*ast.Term)
	if !ok {
		return nil, fmt.Errorf("engine: explaining: unexpected result %T", rs[0].Expressions[0].Value)
	}
	obj, ok := t.Value.(ast.Object)
	if !ok {
		return nil, fmt.Errorf("engine: explaining: unexpected result %v", t)
	}
	err = obj.Iter(func(k, v *ast.Term) error {
		id, ok := k.Value.(ast.String)
		set, ok2 := v.Value.(ast.Set)
		if !ok || !ok2 {
			return fmt.Errorf("unexpected fields %v: %v", k, v)
		}
		names := map[string]bool{}
		err := set.Iter(func(n *ast.Term) error {
			s, ok := n.Value.(ast.String)
			if !ok {
				return fmt.Errorf("unexpected field name %v", n)
			}
			names[string(s)] = true
			return nil
		})
		out[string(id)] = names
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("engine: explaining: %w", err)
	}
	return out, nil
}

// explainPolicy explains one applicable policy from the outcome of its
// fields, and holds it to the rules the engine matched.
func explainPolicy(e *entry, isHTTP bool, ok map[string]bool, tr *trace, in ast.Object) (PolicyTrace, error) {
	p := e.policy
	pt := PolicyTrace{
		Policy: p.Key(), Origin: p.Origin, Action: p.Action.String(), Provider: p.Provider,
		DryRun: p.DryRun, Selector: p.Selector, Rules: []RuleTrace{},
	}
	engineMatched := tr.matched[e.idStr]
	for i, rule := range p.Rules {
		rt := RuleTrace{Rule: i, Field: fmt.Sprintf("spec.rules[%d]", i)}
		r := rule
		if !isHTTP {
			tcp, kept := rule.ForTCP(p.Action)
			if !kept {
				rt.SkippedForTCP = true
			} else {
				rt.DroppedForTCP = dropped(rule, tcp)
			}
			r = tcp
		}
		if !rt.SkippedForTCP {
			rt.Matched, rt.Misses = explainRule(r, ok, p.Action, in)
		}
		if rt.Matched != slices.Contains(engineMatched, i) {
			return pt, fmt.Errorf("%w: %s %s: the fields say matched=%t, the engine %v", ErrExplanationDisagrees, p.Key(), rt.Field, rt.Matched, engineMatched)
		}
		if rt.Matched && !pt.Matched {
			n := i
			pt.Matched, pt.Rule = true, &n
		}
		pt.Rules = append(pt.Rules, rt)
	}
	if len(p.Rules) == 0 && len(engineMatched) > 0 {
		return pt, fmt.Errorf("%w: %s has no rules, the engine matched %v", ErrExplanationDisagrees, p.Key(), engineMatched)
	}
	if allowed, asked := tr.provider[e.idStr]; asked {
		pt.ProviderAllowed = &allowed
	}
	return pt, nil
}

// explainRule adds up a rule's fields as the generated rule does: one
// from entry, one to entry and every when condition; it returns the
// misses of the first part that fails.
func explainRule(r policy.Rule, ok map[string]bool, a policy.Action, in ast.Object) (bool, []FieldMiss) {
	firstMiss := func(m policy.Match) *policy.Field {
		for i := range m {
			if !ok[m[i].Name] {
				return &m[i]
			}
		}
		return nil
	}
	anyOf := func(ms []policy.Match) (bool, []FieldMiss) {
		if len(ms) == 0 {
			return true, nil
		}
		var misses []FieldMiss
		for _, m := range ms {
			f := firstMiss(m)
			if f == nil {
				return true, nil
			}
			misses = append(misses, fieldMiss(*f, a, in))
		}
		return false, misses
	}
	if m, misses := anyOf(r.From); !m {
		return false, misses
	}
	if m, misses := anyOf(r.To); !m {
		return false, misses
	}
	if f := firstMiss(r.When); f != nil {
		return false, []FieldMiss{fieldMiss(*f, a, in)}
	}
	return true, nil
}

func fieldMiss(f policy.Field, a policy.Action, in ast.Object) FieldMiss {
	key := authzrego.InputKey(f)
	fm := FieldMiss{Field: f.Name, Attribute: key, Header: f.HeaderName, Not: f.Not, Value: inputValue(in, key)}
	for _, v := range f.Values {
		fm.Wanted = append(fm.Wanted, valueString(v))
	}
	switch {
	case a != policy.Allow && (f.Attr == policy.SourceNamespace || f.Attr == policy.SourceServiceAccount):
		fm.Attribute, fm.Value = "source.principal", nil
		if id := inputValue(in, policy.SourcePrincipal.String()); id != nil {
			v := "spiffe://" + *id
			fm.Value = &v
		}
		fm.Note = "outside ALLOW, Istio matches namespaces and service accounts against the whole SPIFFE ID"
	case f.Attr == policy.Host && a != policy.Allow:
		if n := inputValue(in, authzrego.NormalizedHostKey); n != nil && fm.Value != nil && *n != *fm.Value {
			fm.Note = "also tried without its port and trailing dot: " + strconv.Quote(*n)
		}
	case f.Attr.NeedsPeer() && fm.Value == nil:
		fm.Note = "the request has no peer identity (no mTLS)"
	}
	return fm
}

func inputValue(in ast.Object, key string) *string {
	if in == nil {
		return nil
	}
	t := in.Get(ast.StringTerm(key))
	if t == nil {
		return nil
	}
	var s string
	switch v := t.Value.(type) {
	case ast.String:
		s = string(v)
	default:
		s = v.String()
	}
	return &s
}

// valueString is a value as the policy wrote it.
func valueString(v policy.Value) string {
	switch v.Kind {
	case policy.Prefix:
		return v.S + "*"
	case policy.Suffix:
		return "*" + v.S
	case policy.Presence:
		return "*"
	case policy.CIDR:
		return v.Prefix.String()
	case policy.Port:
		return strconv.Itoa(v.Port)
	}
	return v.S
}

// dropped names the fields of r that tcp lacks.
func dropped(r, tcp policy.Rule) []string {
	kept := map[string]bool{}
	tcp.EachField(func(f policy.Field) { kept[f.Name] = true })
	var out []string
	r.EachField(func(f policy.Field) {
		if !kept[f.Name] {
			out = append(out, f.Name)
		}
	})
	return out
}

func attributes(r *request) Attributes {
	a := Attributes{Protocol: "tcp", SourceIP: addrString(r.sourceAddr), RemoteIP: addrString(r.remoteAddr()), DestinationIP: addrString(r.destAddr), SNI: r.sni}
	if r.hasSource {
		a.Principal = r.source.Principal
	}
	if r.hasPort {
		a.DestinationPort = r.destPort
	}
	if r.http {
		a.Protocol, a.Method, a.Host, a.Path = "http", r.method, r.host, r.path
		// As sent, but never its query, which may carry secrets.
		sent, _, _ := strings.Cut(r.rawPath, "?")
		switch {
		case r.pathErr != nil:
			a.Path = sent
		case sent != r.path:
			a.SentPath = sent
		}
	}
	return a
}

// selection lists the namespaces whose policies apply and the policies
// of those namespaces whose selector leaves the workload out.
func (s *Set) selection(w Workload) ([]string, []NotSelected) {
	nss := []string{s.root}
	if w.Namespace != s.root {
		nss = append(nss, w.Namespace)
	}
	var out []NotSelected
	for _, ns := range nss {
		for _, e := range s.byNamespace[ns] {
			if e.policy.Selects(w.Labels) {
				continue
			}
			keys := make([]string, 0, len(e.policy.Selector))
			for k := range e.policy.Selector {
				keys = append(keys, k)
			}
			sort.Strings(keys)
			for _, k := range keys {
				want := e.policy.Selector[k]
				got, has := w.Labels[k]
				if has && got == want {
					continue
				}
				why := fmt.Sprintf("selector %s=%s: the workload has no label %s", k, want, k)
				if has {
					why = fmt.Sprintf("selector %s=%s: the workload has %s=%s", k, want, k, got)
				}
				out = append(out, NotSelected{Policy: e.policy.Key(), Why: why})
				break
			}
		}
	}
	return nss, out
}

// MatchingRules decides req as Check does and returns every rule of every
// applicable policy that matched (by policy key, rules ascending), not
// only the lowest one a decision names. Tests hold explanations to it.
func (s *Set) MatchingRules(ctx context.Context, req *authv3.CheckRequest) (map[string][]int, error) {
	tr := &trace{matched: map[string][]int{}, provider: map[string]bool{}}
	if err := s.run(ctx, req, tr, new(Decision)); err != nil && !tr.evaluated {
		return nil, err
	}
	out := map[string][]int{}
	for _, e := range tr.applicable {
		if rules := tr.matched[e.idStr]; len(rules) > 0 {
			out[e.policy.Key()] = slices.Sorted(slices.Values(rules))
		}
	}
	return out, nil
}
