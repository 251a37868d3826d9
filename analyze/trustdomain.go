package analyze

import (
	"fmt"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
)

var trustDomainAnalyzer = Analyzer{
	Code: "TMA003",
	Name: "trust-domain",
	Description: "A principal or trust domain that is not the mesh's (--trust-domain): no peer of this mesh presents it, " +
		"so the value never matches.",
	Run: func(in *Input) ([]Finding, string) {
		if in.TrustDomain.IsZero() {
			return nil, "no trust domain was given (--trust-domain)"
		}
		var out []Finding
		for _, p := range in.Policies {
			eachValue(p, func(f policy.Field, i int, v policy.Value) {
				td := ""
				switch f.Attr {
				case policy.SourcePrincipal:
					td = foreignDomain(in, v)
				case policy.SourceTrustDomain:
					if v.Kind == policy.Exact && v.S != in.TrustDomain.Name() {
						td = v.S
					}
				}
				if td == "" {
					return
				}
				mine := in.TrustDomain.Name()
				fix := "use " + mine + "/ns/NAMESPACE/sa/SERVICEACCOUNT"
				if f.Attr == policy.SourceTrustDomain {
					fix = "use " + mine
				}
				out = append(out, Finding{
					Code: "TMA003", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin,
					Field: fmt.Sprintf("%s[%d]", f.Name, i),
					Message: fmt.Sprintf("%q is of trust domain %s, but this mesh's is %s: no peer presents it, so it never matches. "+
						"%s, or run analyze with --trust-domain %s if that is the mesh's", valueString(v), td, mine, strings.ToUpper(fix[:1])+fix[1:], td),
				})
			})
		}
		return out, ""
	},
}

// foreignDomain returns the trust domain a principal value names when it is
// provably not in.TrustDomain, and "" otherwise: an exact principal, or a
// prefix that includes the trust domain's "/"; a prefix shorter than that
// only when the mesh's trust domain does not start with it. Suffixes and
// "*" can match anything.
func foreignDomain(in *Input, v policy.Value) string {
	if in.TrustDomain.IsZero() {
		return ""
	}
	mine := in.TrustDomain.Name()
	switch v.Kind {
	case policy.Exact, policy.Prefix:
		td, _, full := strings.Cut(v.S, "/")
		if !full {
			if v.Kind == policy.Exact || strings.HasPrefix(mine, td) {
				return "" // not a SPIFFE-ID-shaped value; or may match ours
			}
			return td + "…"
		}
		if td != mine {
			return td
		}
	}
	return ""
}
