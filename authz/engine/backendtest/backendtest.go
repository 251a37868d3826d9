// Package backendtest holds the engine's back ends to each other: the
// native evaluator and the Rego one must make the same decision, name the
// same policy and rule, and match the same rules, on every request.
package backendtest

import (
	"context"
	"encoding/json"
	"fmt"
	"reflect"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// Pair is a set and the same set built for the Rego back end.
type Pair struct {
	Native, Rego *engine.Set
}

// NewPair returns native (which must serve with BackendNative) and its
// BackendRego twin.
func NewPair(ctx context.Context, native *engine.Set) (*Pair, error) {
	if native.Backend() != engine.BackendNative {
		return nil, fmt.Errorf("backendtest: the set is built for %q, want %q", native.Backend(), engine.BackendNative)
	}
	r, err := native.WithBackend(ctx, engine.BackendRego)
	if err != nil {
		return nil, fmt.Errorf("backendtest: the Rego back end refuses what the native one built: %w", err)
	}
	return &Pair{Native: native, Rego: r}, nil
}

// Disagreements checks req on both back ends and describes every way
// they differ; none means they agree.
func (p *Pair) Disagreements(ctx context.Context, req *authv3.CheckRequest) []string {
	_, out, _ := p.Decide(ctx, req)
	mn, errN := p.Native.MatchingRules(ctx, req)
	mr, errR := p.Rego.MatchingRules(ctx, req)
	if (errN == nil) != (errR == nil) || !reflect.DeepEqual(mn, mr) {
		out = append(out, fmt.Sprintf("matching rules: native %v (%v), rego %v (%v)", mn, errN, mr, errR))
	}
	return out
}

// Decide checks req on both back ends and returns the native decision
// and error, and how the Rego back end's decision differs from it (none
// when they agree). Unlike Disagreements, it leaves out the matching
// rules, for callers that check those otherwise.
func (p *Pair) Decide(ctx context.Context, req *authv3.CheckRequest) (*engine.Decision, []string, error) {
	var out []string
	dn, errN := p.Native.Check(ctx, req)
	dr, errR := p.Rego.Check(ctx, req)
	if (errN == nil) != (errR == nil) {
		out = append(out, fmt.Sprintf("error: native %v, rego %v", errN, errR))
	}
	if !reflect.DeepEqual(comparable(dn), comparable(dr)) {
		out = append(out, fmt.Sprintf("decision: native %s, rego %s", show(dn), show(dr)))
	}
	return dn, out, errN
}

// comparable is the decision without what only says how it was reached
// (the error text names the back end's evaluation).
func comparable(d *engine.Decision) engine.Decision {
	c := *d
	if c.Reason == engine.ReasonEvaluationError {
		c.Error = "(evaluation error)"
	}
	return c
}

func show(d *engine.Decision) string {
	b, _ := json.Marshal(d)
	return string(b)
}
