package analyze

import (
	"fmt"

	"github.com/trustmesh/trustmesh/authz/policy"
)

var customProviderAnalyzer = Analyzer{
	Code: "TMA021",
	Name: "custom-provider",
	Description: "A CUSTOM policy whose provider no loaded bundle defines: the engine refuses the whole policy set " +
		"at load. Judged by the engine's own check.",
	Run: func(in *Input) ([]Finding, string) {
		var custom []*policy.Policy
		for _, p := range in.Policies {
			if p.Action == policy.Custom {
				custom = append(custom, p)
			}
		}
		if len(custom) == 0 {
			return nil, ""
		}
		if in.Providers == nil {
			return nil, "no Rego bundle was given (--bundle, or bundles.txt in a -f directory), so CUSTOM providers cannot be checked"
		}
		var out []Finding
		for _, p := range custom {
			err := in.Providers(p.Provider)
			if err == nil {
				continue
			}
			out = append(out, Finding{
				Code: "TMA021", Severity: SeverityError, Object: policyObject(p), Origin: p.Origin,
				Field: "spec.provider.name",
				Message: fmt.Sprintf("%v; the engine refuses every policy while this one stays: load the bundle that defines it "+
					"(--bundle, or a line in the policy directory's bundles.txt), or fix the provider name", err),
			})
		}
		return out, ""
	},
}
