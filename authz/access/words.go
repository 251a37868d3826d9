package access

import (
	"strconv"
	"strings"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/symbolic"
)

// literalWords says a literal in words, e.g. `request.method is "GET" or
// "HEAD"`, `request.path starts with "/admin/"`, `request.headers[x-token]
// is absent`. With a redactor, the values quoted are those the decision log
// would show: a header's only when its name is allowlisted, a path's through
// the path patterns.
func literalWords(l symbolic.Literal, red *decisionlog.Redactor) string {
	key := l.Key.String()
	var alts, nots []string
	anyValue := false
	for _, p := range l.Patterns {
		if red != nil {
			switch l.Key.Attr {
			case policy.Header:
				p.S = red.Header(l.Key.Header, p.S)
			case policy.Path:
				p.S = red.Path(p.S)
			}
		}
		if p.Kind == symbolic.Any {
			anyValue = true
		}
		alts = append(alts, patternWords(p, false))
		nots = append(nots, patternWords(p, true))
	}
	list := strings.Join(alts, " or ")
	none := strings.Join(nots, " and ")
	maybeAbsent := l.Key.Attr == policy.Header || l.Key.Attr == policy.SNI || l.Key.Attr == policy.SourceIP ||
		l.Key.Attr == policy.RemoteIP || l.Key.Attr == policy.DestinationIP || l.Key.Attr.NeedsPeer()
	switch l.Op {
	case symbolic.In:
		if anyValue {
			return key + " is present"
		}
		return key + " " + list
	case symbolic.NotIn:
		if anyValue {
			return key + " is absent"
		}
		s := key + " " + none
		if maybeAbsent {
			s += " (or is absent)"
		}
		return s
	}
	if anyValue {
		return key + " is present and absent (never)"
	}
	return key + " is present and " + none
}

// patternWords says one pattern (or, with not, its negation) as the
// predicate of its key.
func patternWords(p symbolic.Pattern, not bool) string {
	pick := func(yes, no string) string {
		if not {
			return no
		}
		return yes
	}
	switch p.Kind {
	case symbolic.Exact:
		return pick("is ", "is not ") + strconv.Quote(p.S)
	case symbolic.Prefix:
		return pick("starts with ", "does not start with ") + strconv.Quote(p.S)
	case symbolic.Suffix:
		return pick("ends with ", "does not end with ") + strconv.Quote(p.S)
	case symbolic.NonEmpty:
		return pick("is not empty", "is empty")
	case symbolic.Any:
		return pick("is present", "is absent")
	case symbolic.CIDR:
		return pick("is in ", "is not in ") + p.Prefix.String()
	case symbolic.Port:
		return pick("is ", "is not ") + strconv.Itoa(p.Port)
	}
	return pick("matches ", "does not match ") + strconv.Quote(p.S)
}
