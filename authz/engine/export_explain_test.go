package engine

import "github.com/trustmesh/trustmesh/authz/policy"

// ExplainDisagreementForTest explains a rule that matches everything
// against an engine that matched nothing.
func ExplainDisagreementForTest() error {
	p := &policy.Policy{Namespace: "foo", Name: "allow-all", Action: policy.Allow, Rules: []policy.Rule{{}}}
	_, err := explainPolicy(&entry{idStr: "p0", policy: p}, true, map[string]bool{}, &trace{matched: map[string][]int{}}, nil)
	return err
}
