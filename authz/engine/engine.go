// Package engine decides ext_authz checks with exact Istio
// AuthorizationPolicy semantics.
//
// An Engine holds the last good *Set (policies compiled to Rego by
// authz/rego, plus the Rego bundles that serve CUSTOM providers) and swaps
// it atomically, so a half-loaded set never serves. For each check it
// indexes the policies that apply to the destination workload (root
// namespace and the workload's namespace, by selector), evaluates them with
// one prepared OPA query, and applies Istio's order: CUSTOM, then DENY, then
// ALLOW. Every error denies.
package engine

import (
	"context"
	"errors"
	"fmt"
	"net/http"
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
	s := e.cur.Load()
	if s == nil {
		return errorDecision(ErrNoPolicySet), ErrNoPolicySet
	}
	return s.run(ctx, req, nil)
}

// run is Check on s; with tr, it also records how it decided (see
// Set.Explain).
func (s *Set) run(ctx context.Context, req *authv3.CheckRequest, tr *trace) (*Decision, error) {
	d, err := s.check(ctx, req, tr)
	if err != nil {
		err = fmt.Errorf("engine: %w", err)
		ed := errorDecision(err)
		if d != nil {
			ed.Dest, ed.Applied = d.Dest, d.Applied
		}
		d = ed
	}
	d.PolicyVersion, d.PolicyDigest = s.version, s.digest
	return d, err
}

func errorDecision(err error) *Decision {
	return &Decision{HTTPStatus: http.StatusForbidden, Reason: ReasonEvaluationError, Error: err.Error()}
}

// Check decides req against this set alone; Engine.Check is the same on
// the current set. It is exported for `trustmesh policy check`.
func (s *Set) Check(ctx context.Context, req *authv3.CheckRequest) (*Decision, error) {
	e := &Engine{}
	e.Swap(s)
	return e.Check(ctx, req)
}

func (s *Set) check(ctx context.Context, req *authv3.CheckRequest, tr *trace) (*Decision, error) {
	r, err := newRequest(req, s.gateways)
	if tr != nil {
		tr.req = r
	}
	if err != nil {
		return nil, err
	}
	d := &Decision{Dest: r.dest, HTTPStatus: http.StatusForbidden}
	if r.peerErr != nil {
		d.Reason = ReasonPeerRejected
		d.Error = r.peerErr.Error()
		return d, nil
	}
	if r.http && r.pathErr != nil {
		d.Reason = ReasonPathRejected
		d.Error = r.pathErr.Error()
		return d, nil
	}
	applicable := s.applicable(r.dest)
	d.Applied = len(applicable)
	if tr != nil {
		tr.applicable = applicable
	}
	if len(applicable) == 0 {
		d.Allowed, d.Reason, d.HTTPStatus = true, ReasonNoPolicy, 0
		return d, nil
	}
	matched, err := s.evalMatches(ctx, r, applicable, tr)
	if err != nil {
		return d, err
	}
	if tr != nil {
		tr.evaluated = true
	}

	// CUSTOM: every matching CUSTOM policy asks its provider; any denial
	// denies, with the provider's response.
	for _, e := range applicable {
		p := e.policy
		rule, ok := matched[e.idStr]
		if p.Action != policy.Custom || !ok {
			continue
		}
		res, err := s.evalProvider(ctx, req, r, p.Provider)
		if err != nil {
			return d, fmt.Errorf("%s: provider %q: %w", p.Key(), p.Provider, err)
		}
		if tr != nil {
			tr.provider[e.idStr] = res.Allowed
		}
		if !res.Allowed {
			d.decide(false, ReasonCustomDenied, p, rule)
			d.HTTPStatus, d.Headers, d.ResponseHeadersToAdd, d.Body = res.HTTPStatus, res.Headers, res.ResponseHeadersToAdd, res.Body
			return d, nil
		}
		d.Headers = append(d.Headers, res.Headers...)
		d.ResponseHeadersToAdd = append(d.ResponseHeadersToAdd, res.ResponseHeadersToAdd...)
	}

	for _, e := range applicable {
		if rule, ok := matched[e.idStr]; ok && e.policy.Action == policy.Audit {
			d.Audit = append(d.Audit, Match{Policy: e.policy.Key(), Rule: rule})
		}
	}

	allowed, reason, p, rule := decide(applicable, matched, false)
	d.decide(allowed, reason, p, rule)
	if hasDryRun(applicable) {
		sa, sr, sp, srule := decide(applicable, matched, true)
		d.DryRun = &Shadow{Allowed: sa, Reason: sr}
		if sp != nil {
			d.DryRun.Policy, d.DryRun.Rule = sp.Key(), &srule
		}
	}
	return d, nil
}

func (d *Decision) decide(allowed bool, reason string, p *policy.Policy, rule int) {
	d.Allowed, d.Reason = allowed, reason
	if allowed {
		d.HTTPStatus = 0
	}
	if p != nil {
		d.Policy, d.Action = p.Key(), p.Action.String()
		d.Rule = &rule
	}
}

// decide applies DENY then ALLOW. With withDryRun, dry-run policies count
// as enforced (the shadow decision).
func decide(applicable []*entry, matched map[string]int, withDryRun bool) (bool, string, *policy.Policy, int) {
	enforced := func(p *policy.Policy) bool { return withDryRun || !p.DryRun }
	for _, e := range applicable {
		if rule, ok := matched[e.idStr]; ok && e.policy.Action == policy.Deny && enforced(e.policy) {
			return false, ReasonDenyMatched, e.policy, rule
		}
	}
	anyAllow := false
	for _, e := range applicable {
		if e.policy.Action != policy.Allow || !enforced(e.policy) {
			continue
		}
		anyAllow = true
		if rule, ok := matched[e.idStr]; ok {
			return true, ReasonAllowMatched, e.policy, rule
		}
	}
	if anyAllow {
		return false, ReasonNoAllowMatched, nil, 0
	}
	return true, ReasonNoPolicy, nil, 0
}

func hasDryRun(es []*entry) bool {
	for _, e := range es {
		if e.policy.DryRun {
			return true
		}
	}
	return false
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
	in, err := EnvoyInput(req, r.path)
	if err != nil {
		return nil, err
	}
	v, err := ast.InterfaceToValue(in)
	if err != nil {
		return nil, fmt.Errorf("building provider input: %w", err)
	}
	return prov.eval(ctx, v, s.evalTimeout)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
