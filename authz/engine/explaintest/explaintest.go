// Package explaintest holds an explanation (engine.Explanation) to the
// decision the engine made and to the rules it matched. The engine's case
// tests and the differential test against Istio both use it.
package explaintest

import (
	"encoding/json"
	"fmt"
	"reflect"
	"strings"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// Disagreements lists what in ex disagrees with d, the decision Check made
// for the same request, and with matching, every rule the engine matched
// (Set.MatchingRules). The decision is also replayed from the explanation
// alone, in Istio's order, so a trace that would lead a reader to another
// decision is caught.
func Disagreements(ex *engine.Explanation, d *engine.Decision, matching map[string][]int) []string {
	var out []string
	bad := func(format string, args ...any) { out = append(out, fmt.Sprintf(format, args...)) }
	got, _ := json.Marshal(ex.Decision)
	want, _ := json.Marshal(d)
	if string(got) != string(want) {
		bad("decision %s, Check decided %s", got, want)
	}
	if !ex.Evaluated {
		if len(ex.Policies) != 0 {
			bad("not evaluated, yet %d policies are explained", len(ex.Policies))
		}
		if d.Applied > 0 && d.Reason != engine.ReasonPathRejected && d.Reason != engine.ReasonPeerRejected && d.Reason != engine.ReasonEvaluationError {
			bad("not evaluated, yet %d policies applied and the reason is %q", d.Applied, d.Reason)
		}
		return out
	}
	if len(ex.Policies) != d.Applied {
		bad("%d policies explained, %d applied", len(ex.Policies), d.Applied)
	}
	explained := map[string][]int{}
	for _, p := range ex.Policies {
		for _, r := range p.Rules {
			switch {
			case r.Matched:
				explained[p.Policy] = append(explained[p.Policy], r.Rule)
				if len(r.Misses) > 0 {
					bad("%s %s matched with misses %v", p.Policy, r.Field, r.Misses)
				}
			case !r.SkippedForTCP && len(r.Misses) == 0:
				bad("%s %s missed without a failing field", p.Policy, r.Field)
			}
			for _, m := range r.Misses {
				if !strings.HasPrefix(m.Field, r.Field+".") {
					bad("%s %s: miss %s is not a field of the rule", p.Policy, r.Field, m.Field)
				}
			}
		}
	}
	if len(explained) == 0 {
		explained = nil
	}
	if len(matching) == 0 {
		matching = nil
	}
	if !reflect.DeepEqual(explained, matching) {
		bad("matched rules %v, the engine matched %v", explained, matching)
	}
	if d.Reason == engine.ReasonEvaluationError {
		return out
	}
	allowed, reason, pol, rule := replay(ex, false)
	if allowed != d.Allowed || reason != d.Reason || pol != d.Policy || !sameRule(rule, d.Rule) {
		bad("the trace decides allowed=%t %q %s rule %v; Check decided allowed=%t %q %s rule %v", allowed, reason, pol, deref(rule), d.Allowed, d.Reason, d.Policy, deref(d.Rule))
	}
	if d.DryRun != nil && d.Reason != engine.ReasonCustomDenied {
		allowed, reason, pol, rule := replay(ex, true)
		if allowed != d.DryRun.Allowed || reason != d.DryRun.Reason || pol != d.DryRun.Policy || !sameRule(rule, d.DryRun.Rule) {
			bad("the trace's dry-run decision is allowed=%t %q %s rule %v; Check's is %+v", allowed, reason, pol, deref(rule), *d.DryRun)
		}
	}
	for _, p := range ex.Policies {
		if p.Decides != (p.Policy == d.Policy) {
			bad("%s: decides=%t, Check's deciding policy is %q", p.Policy, p.Decides, d.Policy)
		}
	}
	return out
}

// replay decides from the explanation alone: a CUSTOM provider's denial,
// then the first enforced DENY that matched, then ALLOW.
func replay(ex *engine.Explanation, withDryRun bool) (bool, string, string, *int) {
	for _, p := range ex.Policies {
		if p.Action == "CUSTOM" && p.ProviderAllowed != nil && !*p.ProviderAllowed {
			return false, engine.ReasonCustomDenied, p.Policy, p.Rule
		}
	}
	enforced := func(p engine.PolicyTrace) bool { return withDryRun || !p.DryRun }
	for _, p := range ex.Policies {
		if p.Action == "DENY" && p.Matched && enforced(p) {
			return false, engine.ReasonDenyMatched, p.Policy, p.Rule
		}
	}
	anyAllow := false
	for _, p := range ex.Policies {
		if p.Action != "ALLOW" || !enforced(p) {
			continue
		}
		anyAllow = true
		if p.Matched {
			return true, engine.ReasonAllowMatched, p.Policy, p.Rule
		}
	}
	if anyAllow {
		return false, engine.ReasonNoAllowMatched, "", nil
	}
	return true, engine.ReasonNoPolicy, "", nil
}

func sameRule(a, b *int) bool { return a == nil && b == nil || a != nil && b != nil && *a == *b }

func deref(p *int) any {
	if p == nil {
		return nil
	}
	return *p
}
