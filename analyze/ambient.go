package analyze

import (
	"fmt"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/symbolic"
	"github.com/trustmesh/trustmesh/mesh"
)

// httpOnAmbientAnalyzer reports HTTP-only fields in a policy that selects
// ambient workloads. Their traffic is carried by the node proxy of
// `trustmesh node`, which is L4: it asks ext_authz about each connection
// as TCP (source and destination identities, addresses and ports, no
// request), so every port of an ambient workload is a TCP port to the
// engine, whatever its Service declares. Istio evaluates L7 rules for
// ambient pods in a waypoint proxy; trustmesh has none.
var httpOnAmbientAnalyzer = Analyzer{
	Code: "TMA015",
	Name: "http-fields-on-ambient",
	Description: "A rule with HTTP-only fields (hosts, methods, paths, request.headers) in a policy that selects ambient " +
		"workloads: the node proxy carrying their traffic is L4 and has every connection checked as TCP, where those fields " +
		"are dropped, which broadens a DENY (it denies every connection that matches the rest of the rule) and narrows an " +
		"ALLOW (the rule allows no traffic to them). L7 policy for ambient workloads needs a waypoint, which trustmesh does not have.",
	Run: func(in *Input) ([]Finding, string) {
		if in.Mesh == nil {
			return nil, noMesh
		}
		var out []Finding
		for _, p := range in.Policies {
			var ambient []string
			for i, r := range p.Rules {
				fields := httpFields(r)
				if len(fields) == 0 {
					continue
				}
				// A DENY rule that matches no connection even with its
				// HTTP fields dropped is not broadened (TMA010 reports it
				// when it matches nothing at all).
				if p.Action == policy.Deny && symbolic.Compile(policy.Deny, r, symbolic.TCP).NeverMatches() {
					continue
				}
				if ambient == nil {
					ambient = ambientSelected(in, p)
					if len(ambient) == 0 {
						break
					}
				}
				msg := fmt.Sprintf("this rule uses HTTP-only fields (%s), but the policy selects ambient workloads (%s), whose "+
					"connections the node proxy (L4) has checked as TCP, where those fields are dropped. ",
					strings.Join(fields, ", "), list(ambient))
				switch p.Action {
				case policy.Allow:
					msg += "That narrows this ALLOW: the rule allows those workloads no traffic at all. Allow them with a rule " +
						"without HTTP-only fields (sources, ports), or keep the workloads that need L7 policy on sidecars " +
						"(dataplane-mode sidecar): a waypoint, which Istio uses for L7 policy in ambient mode, is not part of trustmesh"
				case policy.Deny:
					msg += "That broadens this DENY: it denies every connection to those workloads that matches the rest of " +
						"the rule, whatever its requests. Narrow the rule with sources or ports, or keep the workloads that need L7 " +
						"policy on sidecars (dataplane-mode sidecar): a waypoint is not part of trustmesh"
				default:
					msg += fmt.Sprintf("That broadens this %s policy: for those workloads the rule matches every connection that "+
						"matches the rest of it. Keep the workloads that need L7 policy on sidecars (dataplane-mode sidecar)", p.Action)
				}
				out = append(out, Finding{Code: "TMA015", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin,
					Field: rulePath(i), Message: msg})
			}
		}
		return out, ""
	},
}

// ambientSelected names (namespace/pod) the ambient workloads a policy
// selects; an empty, non-nil slice when there are none.
func ambientSelected(in *Input, p *policy.Policy) []string {
	out := []string{}
	seen := map[string]bool{}
	for _, w := range selected(in, p) {
		if w.Mode() != mesh.DataPlaneAmbient || seen[w.Key()] {
			continue
		}
		seen[w.Key()] = true
		out = append(out, w.Namespace+"/"+w.Name)
	}
	return out
}
