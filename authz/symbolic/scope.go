package symbolic

import "github.com/trustmesh/trustmesh/authz/policy"

// AppliesWherever reports whether policy p applies to every workload that
// policy q applies to (policy.Applicable), with root the root namespace: p
// is in the root namespace, or in q's namespace when q is not in the root
// namespace, and p's selector labels are a subset of q's.
func AppliesWherever(p, q *policy.Policy, root string) bool {
	switch {
	case p.Namespace == root:
	case q.Namespace == root:
		return false // q applies mesh-wide, p in one namespace only
	case p.Namespace != q.Namespace:
		return false
	}
	for k, v := range p.Selector {
		if got, ok := q.Selector[k]; !ok || got != v {
			return false
		}
	}
	return true
}

// Overrides reports whether rule di of the DENY policy deny is proved to
// decide every request that rule ai of the ALLOW policy allow matches:
// deny is enforced (not dry-run), applies to every workload allow applies
// to, and its rule covers the allow rule over HTTP and TCP (see Covers).
func Overrides(deny *policy.Policy, di int, allow *policy.Policy, ai int, root string) bool {
	if deny.Action != policy.Deny || deny.DryRun || allow.Action != policy.Allow {
		return false
	}
	if di < 0 || di >= len(deny.Rules) || ai < 0 || ai >= len(allow.Rules) {
		return false
	}
	if !AppliesWherever(deny, allow, root) {
		return false
	}
	return Covers(policy.Deny, deny.Rules[di], policy.Allow, allow.Rules[ai])
}

// RuleRef names one rule of one policy.
type RuleRef struct {
	Policy *policy.Policy
	Rule   int
}

// Deciding returns DENY rules that are proved to decide every request rule
// ai of the ALLOW policy allow matches: one rule when one suffices (see
// Overrides), else a few that do together (each request matched by one of
// them), none of which can be left out; nil when none is proved. Only
// enforced DENY policies that apply to every workload allow applies to
// take part.
func Deciding(policies []*policy.Policy, allow *policy.Policy, ai int, root string) []RuleRef {
	if allow.Action != policy.Allow || ai < 0 || ai >= len(allow.Rules) {
		return nil
	}
	var cands []RuleRef
	for _, d := range policies {
		if d.Action != policy.Deny || d.DryRun || !AppliesWherever(d, allow, root) {
			continue
		}
		for di := range d.Rules {
			if Overrides(d, di, allow, ai, root) {
				return []RuleRef{{d, di}}
			}
			if !NeverMatches(policy.Deny, d.Rules[di]) {
				cands = append(cands, RuleRef{d, di})
			}
		}
	}
	if len(cands) < 2 {
		return nil
	}
	var compiled [2][]Rule
	var target [2]Rule
	for i, p := range []Proto{HTTP, TCP} {
		target[i] = Compile(policy.Allow, allow.Rules[ai], p)
		for _, c := range cands {
			compiled[i] = append(compiled[i], Compile(policy.Deny, c.Policy.Rules[c.Rule], p))
		}
	}
	keep := make([]bool, len(cands))
	for i := range keep {
		keep[i] = true
	}
	covers := func() bool {
		for p := range compiled {
			var union Rule
			for i, r := range compiled[p] {
				if !keep[i] {
					continue
				}
				if r.TooBig {
					return false
				}
				union.Conjs = append(union.Conjs, r.Conjs...)
			}
			if !union.Covers(target[p]) {
				return false
			}
		}
		return true
	}
	if !covers() {
		return nil
	}
	for i := range keep {
		keep[i] = false
		if !covers() {
			keep[i] = true
		}
	}
	var out []RuleRef
	for i, c := range cands {
		if keep[i] {
			out = append(out, c)
		}
	}
	return out
}
