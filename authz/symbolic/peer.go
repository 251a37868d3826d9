package symbolic

import (
	"regexp"
	"slices"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
)

// peerConflict ties the peer's attributes together where one rule names
// the peer exactly: when every principal c may have is one of a few
// exact values, the trust domain, namespace and service account (and
// Istio's regexps on the SPIFFE ID) follow from it, as the engine derives
// them (engine.ParseIdentity). It returns the peer literals that no
// candidate satisfies, or nil.
func peerConflict(c Conj) []Literal {
	var peer []Literal
	var candidates []string
	for _, l := range c {
		if !l.Key.Attr.NeedsPeer() {
			continue
		}
		peer = append(peer, l)
		if l.Key.Attr != policy.SourcePrincipal || l.Op != In || candidates != nil {
			continue
		}
		exact := make([]string, 0, len(l.Patterns))
		for _, p := range l.Patterns {
			if p.Kind != Exact {
				exact = nil
				break
			}
			exact = append(exact, p.S)
		}
		if exact != nil {
			candidates = exact
		}
	}
	if candidates == nil {
		return nil
	}
	for _, p := range candidates {
		if peerSatisfies(p, peer) {
			return nil
		}
	}
	return peer
}

// peerSatisfies reports whether a peer whose principal is p may satisfy
// every literal; a literal it cannot evaluate counts as satisfied.
func peerSatisfies(p string, lits []Literal) bool {
	parts := strings.Split(p, "/")
	if p == "" || slices.Contains(parts, "") {
		return false // not a SPIFFE ID: the engine denies it unevaluated
	}
	values := map[policy.Attribute]string{policy.SourcePrincipal: p, policy.SourceTrustDomain: parts[0]}
	if len(parts) == 5 && parts[1] == "ns" && parts[3] == "sa" {
		values[policy.SourceNamespace] = parts[2]
		values[policy.SourceServiceAccount] = parts[2] + "/" + parts[4]
	}
	for _, l := range lits {
		matched, known := false, true
		for _, pat := range l.Patterns {
			var m, ok bool
			if l.Key.View == PeerRegexp {
				m, ok = peerRegexpMatch(l.Key.Attr, pat, "spiffe://"+p)
			} else {
				v, has := values[l.Key.Attr]
				m, ok = has && matchString(pat, v), pat.Kind != Opaque
			}
			if !ok {
				known = false
			}
			matched = matched || m
		}
		if !known {
			continue
		}
		present := true
		if l.Key.View != PeerRegexp {
			_, present = values[l.Key.Attr]
		}
		var holds bool
		switch l.Op {
		case In:
			holds = present && matched
		case NotIn:
			holds = !present || !matched
		case PresentNotIn:
			holds = present && !matched
		}
		if !holds {
			return false
		}
	}
	return true
}

// peerRegexpMatch matches Istio's regexp for a namespaces or
// serviceAccounts pattern against a whole SPIFFE ID, as authz/rego does.
func peerRegexpMatch(a policy.Attribute, p Pattern, id string) (matched, ok bool) {
	v := policy.Value{S: p.S}
	switch p.Kind {
	case Exact:
		v.Kind = policy.Exact
	case Prefix:
		v.Kind = policy.Prefix
	case Suffix:
		v.Kind = policy.Suffix
	case Any:
		v.Kind = policy.Presence
	default:
		return false, false
	}
	re, ok := policy.IstioPeerRegexp(a, v)
	if !ok {
		return false, false
	}
	m, err := regexp.MatchString("^(?:"+re+")$", id)
	return m, err == nil
}

// regexpConflict ties the parsed namespace and service account (ALLOW's
// reading) to Istio's regexps on the whole SPIFFE ID (the other actions'
// reading). The engine evaluates only well-formed SPIFFE IDs
// (engine.ParseIdentity: no newline, nothing but letters, digits, ".",
// "-", "_" and "/"; any other peer is denied unevaluated), and one with a
// parsed namespace is spiffe://TD/ns/NS/sa/SA, which ".*/ns/P/.*" matches
// whenever the pattern P takes NS, and "spiffe://.+/ns/NS/(.+/|)sa/SA(/.+)?"
// whenever the parsed account is NS/SA. So a conjunction in which the
// parsed value must match patterns that each lie within a regexp the ID
// must not match is unsatisfiable; it returns those literals, or nil.
func regexpConflict(c Conj) []Literal {
	for _, a := range []policy.Attribute{policy.SourceNamespace, policy.SourceServiceAccount} {
		var neg []Pattern
		var negLits []Literal
		for _, l := range c {
			if l.Key.Attr == a && l.Key.View == PeerRegexp && l.Op != In {
				negLits = append(negLits, l)
				for _, p := range l.Patterns {
					if p.Kind != Opaque {
						neg = append(neg, p)
					}
				}
			}
		}
		if len(neg) == 0 {
			continue
		}
		for _, l := range c {
			if l.Key.Attr != a || l.Key.View != Plain || l.Op != In || len(l.Patterns) == 0 {
				continue
			}
			all := true
			for _, p := range l.Patterns {
				if !regexpIncludes(a, p, neg) {
					all = false
					break
				}
			}
			if all {
				return append([]Literal{l}, negLits...)
			}
		}
	}
	return nil
}

// regexpIncludes reports whether every parsed value p takes makes the ID
// match the regexp of some pattern of ns. serviceAccounts values have no
// wildcards, so only the very same account counts there.
func regexpIncludes(a policy.Attribute, p Pattern, ns []Pattern) bool {
	if p.Kind == Opaque {
		return false
	}
	if a == policy.SourceServiceAccount {
		for _, n := range ns {
			if p.Kind == Exact && n.Kind == Exact && p.S == n.S && strings.Contains(p.S, "/") {
				return true
			}
		}
		return false
	}
	return includedIn(p, ns, true)
}
