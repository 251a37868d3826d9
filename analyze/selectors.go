package analyze

import (
	"fmt"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
)

// noMesh is the note of an analyzer that needs the mesh.
const noMesh = "no mesh was given: pass --mesh DIR, or --kubeconfig to read the cluster's"

var selectorsAnalyzer = Analyzer{
	Code: "TMA001",
	Name: "selectors",
	Description: "A policy whose selector matches no workload in the mesh applies to nothing. A policy without a selector " +
		"outside the root namespace is reported too when its namespace has no workload.",
	Run: func(in *Input) ([]Finding, string) {
		if in.Mesh == nil {
			return nil, noMesh
		}
		all := in.Mesh.AllWorkloads()
		var out []Finding
		for _, p := range in.Policies {
			root := p.Namespace == in.RootNamespace
			var inScope []*mesh.Workload
			for _, w := range all {
				if root || w.Namespace == p.Namespace {
					inScope = append(inScope, w)
				}
			}
			selected := 0
			for _, w := range inScope {
				if p.Selects(w.Labels) {
					selected++
				}
			}
			if selected > 0 {
				continue
			}
			where := "namespace " + p.Namespace
			if root {
				where = "the mesh (" + p.Namespace + " is the root namespace)"
			}
			f := Finding{Code: "TMA001", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin}
			switch {
			case len(p.Selector) == 0:
				f.Field = "metadata.namespace"
				f.Message = fmt.Sprintf("%s has no workload, so this policy applies to nothing: create it in the namespace of the workloads it is meant for", where)
			case len(inScope) == 0:
				f.Field = "spec.selector.matchLabels"
				f.Message = fmt.Sprintf("selector %s matches no workload: %s has none. Create the policy in the namespace of the workloads it is meant for",
					labels(p), where)
			default:
				f.Field = "spec.selector.matchLabels"
				f.Message = fmt.Sprintf("selector %s matches none of the %d workloads in %s, so this policy applies to nothing: fix the labels (workloads there carry %s) or delete the policy",
					labels(p), len(inScope), where, sampleLabels(inScope))
			}
			out = append(out, f)
		}
		return out, ""
	},
}

func policyObject(p *policy.Policy) string { return "AuthorizationPolicy " + p.Key() }

func labels(p *policy.Policy) string { return labelSet(p.Selector) }

// labelSet formats labels as {k=v, ...}, sorted.
func labelSet(l map[string]string) string {
	keys := (&policy.Policy{Selector: l}).SortedLabels()
	for i, k := range keys {
		keys[i] = k + "=" + l[k]
	}
	return "{" + strings.Join(keys, ", ") + "}"
}

// sampleLabels lists the distinct label sets of up to three workloads.
func sampleLabels(ws []*mesh.Workload) string {
	seen := map[string]bool{}
	var out []string
	for _, w := range ws {
		s := labelSet(w.Labels)
		if seen[s] {
			continue
		}
		seen[s] = true
		if len(out) == 3 {
			out = append(out, "…")
			break
		}
		out = append(out, s)
	}
	return strings.Join(out, ", ")
}
