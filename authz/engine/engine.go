// Package engine decides ext_authz checks with exact Istio
// AuthorizationPolicy semantics.
//
// An Engine holds the last good *Set (policies compiled, plus the Rego
// bundles that serve CUSTOM providers) and swaps it atomically, so a
// half-loaded set never serves. For each check it indexes the policies
// that apply to the destination workload (root namespace and the
// workload's namespace, by selector), evaluates them, and applies Istio's
// order: CUSTOM, then DENY, then ALLOW. Every error denies.
//
// Policies are evaluated by one of two back ends (SetConfig.Backend): the
// native one (native.go), the default, which compiles the typed model into
// matchers and allocates nothing on the common path; or the Rego one, which
// compiles each policy to Rego (authz/rego) and runs one prepared OPA query
// per check. Tests hold the two, and the RBAC that xDS pushes, to the same
// decisions.
package engine

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sort"
	"sync/atomic"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/metrics"
	oparego "github.com/open-policy-agent/opa/v1/rego"

	"github.com/trustmesh/trustmesh/authz/policy"
)

// ErrNoPolicySet is returned (and denies) before any set has loaded.
var ErrNoPolicySet = errors.New("engine: no policy set loaded")

// Engine serves decisions from the current Set.
type Engine struct {
	cur atomic.Pointer[Set]
}

// New returns an Engine with no Set; it denies until Swap is called.
func New() *Engine { return &Engine{} }

// Swap makes s the set that serves from the next check on.
func (e *Engine) Swap(s *Set) { e.cur.Store(s) }

// Current returns the serving set, or nil.
func (e *Engine) Current() *Set { return e.cur.Load() }

// Reasons a decision gives. ReasonPeerRejected denies a request whose
// source principal is present but not a well-formed SPIFFE ID
// (ParseIdentity), before any policy is evaluated and whatever the
// policies say: Istio's peer regexps and the parsed ID would read such a
// peer differently, so that a DENY on its namespace could miss it while an
// ALLOW on the same namespace matched.
const (
	ReasonNoPolicy        = "no policy applies"
	ReasonAllowMatched    = "ALLOW policy matched"
	ReasonNoAllowMatched  = "no ALLOW policy matched"
	ReasonDenyMatched     = "DENY policy matched"
	ReasonCustomDenied    = "CUSTOM provider denied"
	ReasonPathRejected    = "path rejected by normalization"
	ReasonPeerRejected    = "peer identity rejected"
	ReasonEvaluationError = "evaluation error"
)

// Decision is the outcome of one check.
type Decision struct {
	Allowed bool `json:"allowed"`
	// HTTPStatus is the status of a denied HTTP request.
	HTTPStatus int    `json:"http_status,omitempty"`
	Reason     string `json:"reason"`
	// Policy ("namespace/name") and Rule decided, if a policy did.
	Policy string `json:"policy,omitempty"`
	Rule   *int   `json:"rule,omitempty"`
	Action string `json:"action,omitempty"`
	// Headers go to the upstream on allow and to the client on deny.
	Headers              []Header `json:"headers,omitempty"`
	ResponseHeadersToAdd []Header `json:"response_headers_to_add,omitempty"`
	Body                 string   `json:"body,omitempty"`
	// Matches lists what AUDIT and dry-run policies matched; they never
	// change the decision.
	Audit  []Match  `json:"audit,omitempty"`
	DryRun *Shadow  `json:"dry_run,omitempty"`
	Error  string   `json:"error,omitempty"`
	Dest   Workload `json:"-"`
	// Applied is how many policies applied to the destination.
	Applied int `json:"applied_policies"`
	// PolicyVersion and PolicyDigest name the policy snapshot that decided
	// (SetConfig); the decision log records them.
	PolicyVersion uint64 `json:"-"`
	PolicyDigest  string `json:"-"`
}

// Match is a policy and rule that matched.
type Match struct {
	Policy string `json:"policy"`
	Rule   int    `json:"rule"`
}

// Shadow is the decision the dry-run policies would have made had they been
// enforced.
type Shadow struct {
	Allowed bool   `json:"allowed"`
	Reason  string `json:"reason"`
	Policy  string `json:"policy,omitempty"`
	Rule    *int   `json:"rule,omitempty"`
}

// Check decides req. The Decision is never nil; when err is not nil it
// denies with status 403 (callers that fail open must say so explicitly).
func (e *Engine) Check(ctx context.Context, req *authv3.CheckRequest) (*Decision, error) {
	d := new(Decision)
	err := e.CheckInto(ctx, req, d)
	return d, err
}

// CheckInto is Check writing the decision into *d, every field of which it
// overwrites. It allocates nothing on the common path (no policy applies,
// or one ALLOW rule matches): d.Rule may point at immutable data the Set
// owns, and the engine keeps nothing of d once it returns, so callers may
// pool Decisions.
func (e *Engine) CheckInto(ctx context.Context, req *authv3.CheckRequest, d *Decision) error {
	s := e.cur.Load()
	if s == nil {
		*d = Decision{}
		d.setError(ErrNoPolicySet)
		return ErrNoPolicySet
	}
	return s.run(ctx, req, nil, d)
}

// run is CheckInto on s; with tr, it also records how it decided (see
// Set.Explain).
func (s *Set) run(ctx context.Context, req *authv3.CheckRequest, tr *trace, d *Decision) error {
	*d = Decision{}
	var r request
	err := s.check(ctx, req, &r, tr, d)
	if tr != nil {
		// The trace keeps a copy: r itself stays on the stack.
		r.normalize()
		c := r
		tr.req = &c
	}
	if err != nil {
		err = fmt.Errorf("engine: %w", err)
		dest, applied := d.Dest, d.Applied
		*d = Decision{Dest: dest, Applied: applied}
		d.setError(err)
	}
	d.PolicyVersion, d.PolicyDigest = s.version, s.digest
	return err
}

func (d *Decision) setError(err error) {
	d.HTTPStatus, d.Reason, d.Error = http.StatusForbidden, ReasonEvaluationError, err.Error()
}

// Check decides req against this set alone; Engine.Check is the same on
// the current set. It is exported for `trustmesh policy check`.
func (s *Set) Check(ctx context.Context, req *authv3.CheckRequest) (*Decision, error) {
	d := new(Decision)
	err := s.run(ctx, req, nil, d)
	return d, err
}

// maxStackApplicable is how many applicable policies a check holds
// without allocating.
const maxStackApplicable = 32

func (s *Set) check(ctx context.Context, req *authv3.CheckRequest, r *request, tr *trace, d *Decision) error {
	if err := r.init(req, s.gateways); err != nil {
		return err
	}
	d.Dest, d.HTTPStatus = r.dest, http.StatusForbidden
	if r.peerErr != nil {
		d.Reason = ReasonPeerRejected
		d.Error = r.peerErr.Error()
		return nil
	}
	if r.http && r.pathErr != nil {
		d.Reason = ReasonPathRejected
		d.Error = r.pathErr.Error()
		return nil
	}
	var buf [maxStackApplicable]*entry
	applicable := s.applicableInto(buf[:0], r.dest)
	d.Applied = len(applicable)
	if tr != nil {
		tr.applicable = slices.Clone(applicable)
	}
	if len(applicable) == 0 {
		d.Allowed, d.Reason, d.HTTPStatus = true, ReasonNoPolicy, 0
		return nil
	}
	m := matcher{r: r}
	if s.backend == BackendRego {
		matched, err := s.evalMatches(ctx, r, applicable, tr)
		if err != nil {
			return err
		}
		m.rego = matched
	} else if tr != nil {
		for _, e := range applicable {
			e.native.all(r, func(i int) { tr.matched[e.idStr] = append(tr.matched[e.idStr], i) })
		}
	}
	if tr != nil {
		tr.evaluated = true
	}

	// CUSTOM: every matching CUSTOM policy asks its provider; any denial
	// denies, with the provider's response.
	for _, e := range applicable {
		p := e.policy
		if p.Action != policy.Custom {
			continue
		}
		rule, ok := m.first(e)
		if !ok {
			continue
		}
		r.normalize()
		res, err := s.evalProvider(ctx, req, r, p.Provider)
		if err != nil {
			return fmt.Errorf("%s: provider %q: %w", e.key, p.Provider, err)
		}
		if tr != nil {
			tr.provider[e.idStr] = res.Allowed
		}
		if !res.Allowed {
			d.decide(false, ReasonCustomDenied, e, rule)
			d.HTTPStatus, d.Headers, d.ResponseHeadersToAdd, d.Body = res.HTTPStatus, res.Headers, res.ResponseHeadersToAdd, res.Body
			return nil
		}
		d.Headers = append(d.Headers, res.Headers...)
		d.ResponseHeadersToAdd = append(d.ResponseHeadersToAdd, res.ResponseHeadersToAdd...)
	}

	hasDryRun := false
	for _, e := range applicable {
		hasDryRun = hasDryRun || e.policy.DryRun
		if e.policy.Action != policy.Audit {
			continue
		}
		if rule, ok := m.first(e); ok {
			d.Audit = append(d.Audit, Match{Policy: e.key, Rule: rule})
		}
	}

	allowed, reason, de, rule := m.decide(applicable, false)
	d.decide(allowed, reason, de, rule)
	if !allowed {
		// What allowing CUSTOM providers returned is for the upstream, which
		// a denied request never reaches: none of it goes to the client.
		d.Headers, d.ResponseHeadersToAdd = nil, nil
	}
	if hasDryRun {
		sa, sr, se, srule := m.decide(applicable, true)
		d.DryRun = &Shadow{Allowed: sa, Reason: sr}
		if se != nil {
			d.DryRun.Policy, d.DryRun.Rule = se.key, &se.rules[srule]
		}
	}
	return nil
}

func (d *Decision) decide(allowed bool, reason string, e *entry, rule int) {
	d.Allowed, d.Reason = allowed, reason
	if allowed {
		d.HTTPStatus = 0
	}
	if e != nil {
		d.Policy, d.Action = e.key, e.policy.Action.String()
		d.Rule = &e.rules[rule]
	}
}

// matcher answers which rule of a policy matches a request first: from
// the Rego back end's results, or natively.
type matcher struct {
	r    *request
	rego map[string]int
}

func (m matcher) first(e *entry) (int, bool) {
	if m.rego != nil {
		rule, ok := m.rego[e.idStr]
		return rule, ok
	}
	return e.native.first(m.r)
}

// decide applies DENY then ALLOW. With withDryRun, dry-run policies count
// as enforced (the shadow decision).
func (m matcher) decide(applicable []*entry, withDryRun bool) (bool, string, *entry, int) {
	for _, e := range applicable {
		if e.policy.Action != policy.Deny || !withDryRun && e.policy.DryRun {
			continue
		}
		if rule, ok := m.first(e); ok {
			return false, ReasonDenyMatched, e, rule
		}
	}
	anyAllow := false
	for _, e := range applicable {
		if e.policy.Action != policy.Allow || !withDryRun && e.policy.DryRun {
			continue
		}
		anyAllow = true
		if rule, ok := m.first(e); ok {
			return true, ReasonAllowMatched, e, rule
		}
	}
	if anyAllow {
		return false, ReasonNoAllowMatched, nil, 0
	}
	return true, ReasonNoPolicy, nil, 0
}

// evalMatches runs the prepared query once and returns, for each applicable
// policy with a matching rule, its lowest matching rule index. With tr, it
// also records every matching rule.
func (s *Set) evalMatches(ctx context.Context, r *request, applicable []*entry, tr *trace) (map[string]int, error) {
	ids := make([]*ast.Term, len(applicable))
	for i, e := range applicable {
		ids[i] = e.id
	}
	rs, err := s.matches.Eval(ctx,
		oparego.EvalParsedInput(r.input(ids, s.used, s.headers)),
		oparego.EvalMetrics(noMetrics),
		// Keep the result as Rego terms: converting it to Go values would
		// only be undone below.
		oparego.EvalGenerateJSON(func(t *ast.Term, _ *oparego.EvalContext) (any, error) { return t, nil }),
	)
	if err != nil {
		return nil, fmt.Errorf("evaluating policies: %w", err)
	}
	out := map[string]int{}
	if len(rs) == 0 || len(rs[0].Expressions) == 0 {
		return out, nil
	}
	t, ok := rs[0].Expressions[0].Value.(*ast.Term)
	if !ok {
		return nil, fmt.Errorf("evaluating policies: unexpected result %T", rs[0].Expressions[0].Value)
	}
	obj, ok := t.Value.(ast.Object)
	if !ok {
		return nil, fmt.Errorf("evaluating policies: unexpected result %v", t)
	}
	err = obj.Iter(func(k, v *ast.Term) error {
		id, ok := k.Value.(ast.String)
		if !ok {
			return fmt.Errorf("unexpected policy id %v", k)
		}
		rules, ok := v.Value.(ast.Set)
		if !ok {
			return fmt.Errorf("unexpected rules %v", v)
		}
		best := -1
		err := rules.Iter(func(x *ast.Term) error {
			n, ok := x.Value.(ast.Number)
			if !ok {
				return fmt.Errorf("unexpected rule index %v", x)
			}
			i, ok := n.Int()
			if !ok {
				return fmt.Errorf("unexpected rule index %v", x)
			}
			if best < 0 || i < best {
				best = i
			}
			if tr != nil {
				tr.matched[string(id)] = append(tr.matched[string(id)], i)
			}
			return nil
		})
		if err != nil {
			return err
		}
		if best >= 0 {
			out[string(id)] = best
		}
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("evaluating policies: %w", err)
	}
	return out, nil
}

// noMetrics keeps OPA from allocating timers on every evaluation.
var noMetrics = metrics.NoOp()

func (s *Set) evalProvider(ctx context.Context, req *authv3.CheckRequest, r *request, name string) (*ProviderResult, error) {
	prov, ok := s.providers[name]
	if !ok {
		return nil, fmt.Errorf("%w: %q", ErrUnknownProvider, name)
	}
	return prov.evalRequest(ctx, req, r.path, s.evalTimeout)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
