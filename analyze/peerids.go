package analyze

import (
	"fmt"
	"strings"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
)

var malformedPeerAnalyzer = Analyzer{
	Code: "TMA004",
	Name: "malformed-peer-id",
	Description: "A principal or trust domain that no well-formed SPIFFE ID has (an upper-case trust domain, " +
		"a character outside SPIFFE's set, an empty or dot segment): the engine refuses such peer IDs, so the value never matches.",
	Run: func(in *Input) ([]Finding, string) {
		var out []Finding
		for _, p := range in.Policies {
			eachValue(p, func(f policy.Field, i int, v policy.Value) {
				if canMatchPeer(f.Attr, v) {
					return
				}
				out = append(out, Finding{
					Code: "TMA004", Severity: SeverityWarning, Object: policyObject(p), Origin: p.Origin,
					Field: fmt.Sprintf("%s[%d]", f.Name, i),
					Message: fmt.Sprintf("%q can never match: the engine refuses such peer IDs (a SPIFFE ID's trust domain is "+
						"lower-case letters, digits, '.', '-' and '_'; its path segments also take upper-case letters; "+
						"no empty, '.' or '..' segment)", valueString(v)),
				})
			})
		}
		return out, ""
	},
}

// canMatchPeer reports whether v, a value of attribute a, matches some peer
// ID the engine accepts (engine.ParseIdentity, the engine's own test, so the
// two never disagree). Other attributes and "*" are not judged. A prefix
// is completed, and a suffix preceded, by "x" in a path segment: when that
// makes no well-formed ID, nothing does, since the path takes every byte
// a trust domain takes and "x" makes a partial segment neither empty nor
// a dot segment.
func canMatchPeer(a policy.Attribute, v policy.Value) bool {
	ok := func(id string) bool { _, ok := engine.ParseIdentity("spiffe://" + id); return ok }
	switch a {
	case policy.SourcePrincipal:
		switch v.Kind {
		case policy.Exact:
			return ok(v.S)
		case policy.Prefix:
			return ok(v.S) || ok(v.S+"x")
		case policy.Suffix:
			return ok("td/x" + v.S)
		}
	case policy.SourceTrustDomain:
		if strings.Contains(v.S, "/") {
			return v.Kind == policy.Presence
		}
		switch v.Kind {
		case policy.Exact:
			return ok(v.S)
		case policy.Prefix:
			return ok(v.S) || ok(v.S+"x")
		case policy.Suffix:
			return ok("x" + v.S)
		}
	}
	return true
}
