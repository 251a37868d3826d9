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
