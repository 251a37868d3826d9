package analyze

import (
	"fmt"
	"sort"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
)

var identitiesAnalyzer = Analyzer{
	Code: "TMA002",
	Name: "identities",
	Description: "A principal, namespace or service account that no workload in the mesh has. Exact values are checked; " +
		"a prefix or suffix only when no workload matches it at all. Principals of a foreign trust domain are TMA003's.",
	Run: func(in *Input) ([]Finding, string) {
		if in.Mesh == nil {
			return nil, noMesh
		}
		known := map[policy.Attribute]map[string]bool{
			policy.SourcePrincipal:      {},
			policy.SourceNamespace:      {},
			policy.SourceServiceAccount: {},
		}
		for _, w := range in.Mesh.AllWorkloads() {
			known[policy.SourcePrincipal][strings.TrimPrefix(w.ID.String(), "spiffe://")] = true
			known[policy.SourceNamespace][w.Namespace] = true
			known[policy.SourceServiceAccount][w.Namespace+"/"+w.ServiceAccount] = true
		}
		var out []Finding
		for _, p := range in.Policies {
			eachValue(p, func(f policy.Field, i int, v policy.Value) {
				set, ok := known[f.Attr]
				if !ok {
					return
				}
				if f.Attr == policy.SourcePrincipal && foreignDomain(in, v) != "" {
					return // TMA003 reports it
				}
				switch v.Kind {
				case policy.Exact:
					if set[v.S] {
						return
					}
				case policy.Prefix, policy.Suffix:
					for k := range set {
						if v.Kind == policy.Prefix && strings.HasPrefix(k, v.S) || v.Kind == policy.Suffix && strings.HasSuffix(k, v.S) {
							return
						}
					}
				default:
					return
				}
				out = append(out, Finding{
					Code: "TMA002", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin,
					Field:   fmt.Sprintf("%s[%d]", f.Name, i),
					Message: identityMessage(f, v, set),
				})
			})
		}
		return out, ""
	},
}

// eachValue calls fn for every value of every field of the policy's rules,
// with its index in the field.
func eachValue(p *policy.Policy, fn func(f policy.Field, i int, v policy.Value)) {
	for _, r := range p.Rules {
		r.EachField(func(f policy.Field) {
			for i, v := range f.Values {
				fn(f, i, v)
			}
		})
	}
}

// valueString is the value as the policy writes it.
func valueString(v policy.Value) string {
	switch v.Kind {
	case policy.Prefix:
		return v.S + "*"
	case policy.Suffix:
		return "*" + v.S
	case policy.Presence:
		return "*"
	}
	return v.S
}

func identityMessage(f policy.Field, v policy.Value, known map[string]bool) string {
	what := map[policy.Attribute]string{
		policy.SourcePrincipal:      "principal",
		policy.SourceNamespace:      "namespace",
		policy.SourceServiceAccount: "service account",
	}[f.Attr]
	var b strings.Builder
	if v.Kind == policy.Exact {
		fmt.Fprintf(&b, "%s %q is that of no workload in the mesh", what, v.S)
	} else {
		fmt.Fprintf(&b, "%s pattern %q matches no workload in the mesh", what, valueString(v))
	}
	if near := nearest(v.S, known); near != "" {
		fmt.Fprintf(&b, " (did you mean %q?)", near)
	}
	if f.Not {
		b.WriteString(": excluding it excludes nobody. Fix the value, or remove it")
	} else {
		b.WriteString(": no request matches it. Fix the value, or deploy the workload it names")
	}
	return b.String()
}

// nearest returns the known value closest to s, if it is close: at most a
// third of its length away, as a typo is.
func nearest(s string, known map[string]bool) string {
	keys := make([]string, 0, len(known))
	for k := range known {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	best, bestD := "", len(s)/3+1
	for _, k := range keys {
		if d := editDistance(s, k); d < bestD {
			best, bestD = k, d
		}
	}
	return best
}

func editDistance(a, b string) int {
	prev := make([]int, len(b)+1)
	cur := make([]int, len(b)+1)
	for j := range prev {
		prev[j] = j
	}
	for i := 1; i <= len(a); i++ {
		cur[0] = i
		for j := 1; j <= len(b); j++ {
			c := prev[j-1]
			if a[i-1] != b[j-1] {
				c++
			}
			cur[j] = min(c, prev[j]+1, cur[j-1]+1)
		}
		prev, cur = cur, prev
	}
	return prev[len(b)]
}
