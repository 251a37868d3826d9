// Package symbolic reasons about AuthorizationPolicy rules (authz/policy)
// without a request: it proves that a rule can never match, or that every
// request one rule matches another matches too. `trustmesh analyze` reports
// dead and shadowed rules with it; any later view of "who may reach what"
// should use it rather than a second reading of the semantics.
//
// The analysis is sound but incomplete. It models exactly what the engine
// evaluates (authz/rego): absent attributes, negated fields that hold on an
// absent attribute, NeedsPeer fields of ALLOW policies, Istio's regular
// expressions for namespaces and service accounts outside ALLOW, raw and
// normalized hosts, and the TCP form of a rule (policy.Rule.ForTCP). It
// reasons over exact, prefix and suffix strings, presence, CIDRs and ports.
// Everything else (path templates, IPv4-mapped IPv6 blocks) is opaque: it
// never takes part in a proof. Attributes are treated as independent of one
// another (the request space it reasons over is larger than the real one),
// which only ever loses proofs. A false answer always means "not proved",
// never "proved otherwise".
package symbolic

import (
	"net/netip"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
)

// Proto is the kind of check a rule is evaluated for.
type Proto int

// The protocols: HTTP checks see every field, TCP checks the rule's TCP
// form (policy.Rule.ForTCP).
const (
	HTTP Proto = iota
	TCP
)

func (p Proto) String() string {
	if p == TCP {
		return "tcp"
	}
	return "http"
}

// View says how a rule of a given action reads an attribute.
type View int

// The views.
const (
	// Plain is the attribute as the engine's input holds it: one value,
	// or absent.
	Plain View = iota
	// Normalized is request.host without a :port and one trailing dot,
	// which hosts fields outside ALLOW also try.
	Normalized
	// PeerRegexp is source.namespace or source.serviceAccount outside
	// ALLOW: Istio's regular expression over the whole SPIFFE ID
	// (policy.IstioPeerRegexp). A SPIFFE ID can match several such
	// expressions at once (".../ns/a/ns/b/..."), so values of this view
	// are never intersected, only compared by inclusion.
	PeerRegexp
)

// Key is one thing a rule reads from a request.
type Key struct {
	Attr   policy.Attribute
	Header string // the lower-cased header name for policy.Header
	View   View
}

func (k Key) String() string {
	s := k.Attr.String()
	if k.Attr == policy.Header {
		s = "request.headers[" + k.Header + "]"
	}
	switch k.View {
	case Normalized:
		s += " (normalized)"
	case PeerRegexp:
		s += " (Istio regexp on the SPIFFE ID)"
	}
	return s
}

// PatternKind says what values a Pattern matches.
type PatternKind int

// The kinds of patterns.
const (
	Exact    PatternKind = iota // the string S
	Prefix                      // strings that start with S
	Suffix                      // strings that end with S
	NonEmpty                    // any non-empty string
	Any                         // any value the attribute has, even empty
	CIDR                        // addresses in Prefix
	Port                        // the port number Port
	Opaque                      // something the analysis does not reason about (a path template, ...)
)

// Pattern is one value of a field, as the engine matches it.
type Pattern struct {
	Kind   PatternKind
	S      string
	Prefix netip.Prefix
	Port   int
}

// Op is how a literal constrains its key.
type Op int

// The operators.
const (
	// In holds when the attribute is present and some pattern matches.
	In Op = iota
	// NotIn holds when the attribute is absent or no pattern matches.
	NotIn
	// PresentNotIn holds when the attribute is present and no pattern
	// matches: a negated peer field of an ALLOW policy.
	PresentNotIn
)

// Literal is one field of a rule, as a constraint on one key.
type Literal struct {
	Key      Key
	Op       Op
	Patterns []Pattern
	// Field is the policy field the literal comes from, e.g.
	// "spec.rules[0].from[0].source.notPrincipals"; empty for literals
	// the analysis makes up (negations).
	Field string
}

// Conj is a conjunction of literals: one way a rule can match.
type Conj []Literal

// Rule is a rule as one action evaluates it for one protocol: a
// disjunction of conjunctions (one per source × operation combination, and
// per alternative of a field that reads two keys).
type Rule struct {
	Conjs []Conj
	// TooBig is set when the disjunction was too large to build; such a
	// rule takes part in no proof.
	TooBig bool
}

// maxConjs bounds the disjunctive form of a rule.
const maxConjs = 4096

// Compile returns rule r of a policy with action a, as the engine
// evaluates it for protocol p. An ALLOW rule that uses HTTP-only fields
// compiles, for TCP, to a rule with no conjunctions: it matches nothing.
func Compile(a policy.Action, r policy.Rule, p Proto) Rule {
	if p == TCP {
		tr, ok := r.ForTCP(a)
		if !ok {
			return Rule{}
		}
		r = tr
	}
	out := []Conj{{}}
	and := func(alts []Conj) bool {
		if len(out)*len(alts) > maxConjs {
			return false
		}
		next := make([]Conj, 0, len(out)*len(alts))
		for _, x := range out {
			for _, y := range alts {
				c := make(Conj, 0, len(x)+len(y))
				next = append(next, append(append(c, x...), y...))
			}
		}
		out = next
		return true
	}
	matches := func(ms []policy.Match) []Conj {
		var alts []Conj
		for _, m := range ms {
			conj := []Conj{{}}
			for _, f := range m {
				conj = product(conj, fieldAlts(a, f))
				if len(conj) > maxConjs {
					return nil
				}
			}
			alts = append(alts, conj...)
		}
		return alts
	}
	for _, ms := range [][]policy.Match{r.From, r.To} {
		if len(ms) == 0 {
			continue
		}
		alts := matches(ms)
		if alts == nil || !and(alts) {
			return Rule{TooBig: true}
		}
	}
	for _, f := range r.When {
		if !and(fieldAlts(a, f)) {
			return Rule{TooBig: true}
		}
	}
	return Rule{Conjs: out}
}

func product(xs, ys []Conj) []Conj {
	out := make([]Conj, 0, len(xs)*len(ys))
	for _, x := range xs {
		for _, y := range ys {
			c := make(Conj, 0, len(x)+len(y))
			out = append(out, append(append(c, x...), y...))
		}
	}
	return out
}

// fieldAlts returns the alternatives (ORed conjunctions) a field of a
// policy with action a stands for, following authz/rego exactly.
func fieldAlts(a policy.Action, f policy.Field) []Conj {
	key := Key{Attr: f.Attr, Header: f.HeaderName}
	if a != policy.Allow && (f.Attr == policy.SourceNamespace || f.Attr == policy.SourceServiceAccount) {
		key.View = PeerRegexp
	}
	pats := make([]Pattern, len(f.Values))
	for i, v := range f.Values {
		pats[i] = pattern(key, v)
	}
	lit := func(k Key, op Op) Literal { return Literal{Key: k, Op: op, Patterns: pats, Field: f.Name} }
	norm := Key{Attr: policy.Host, View: Normalized}
	if f.Attr == policy.Host {
		// authz/rego hostField: an ALLOW hosts matches the host as sent;
		// an ALLOW notHosts holds when neither form is listed; elsewhere
		// hosts matches either form and notHosts holds when either form
		// is not listed.
		switch {
		case a == policy.Allow && !f.Not:
			return []Conj{{lit(key, In)}}
		case a == policy.Allow:
			return []Conj{{lit(key, NotIn), lit(norm, NotIn)}}
		case !f.Not:
			return []Conj{{lit(key, In)}, {lit(norm, In)}}
		}
		return []Conj{{lit(key, NotIn)}, {lit(norm, NotIn)}}
	}
	switch {
	case !f.Not:
		return []Conj{{lit(key, In)}}
	case f.Attr.NeedsPeer() && a == policy.Allow:
		return []Conj{{lit(key, PresentNotIn)}}
	}
	return []Conj{{lit(key, NotIn)}}
}

// pattern turns a policy value into the pattern the engine matches for key.
func pattern(key Key, v policy.Value) Pattern {
	switch v.Kind {
	case policy.Exact:
		return Pattern{Kind: Exact, S: v.S}
	case policy.Prefix:
		return Pattern{Kind: Prefix, S: v.S}
	case policy.Suffix:
		return Pattern{Kind: Suffix, S: v.S}
	case policy.Presence:
		// authz/rego valueExpr: is_string for headers and hosts, != ""
		// elsewhere; Istio's regexp turns "*" into ".*", which matches
		// an empty segment too.
		if key.Attr == policy.Header || key.Attr == policy.Host || key.View == PeerRegexp {
			return Pattern{Kind: Any}
		}
		return Pattern{Kind: NonEmpty}
	case policy.CIDR:
		if !v.Prefix.IsValid() || v.Prefix.Addr().Is4In6() || v.Prefix.Addr().Zone() != "" {
			// OPA's net.cidr_contains follows Go's net package on
			// IPv4-mapped blocks; the analysis does not follow it there.
			return Pattern{Kind: Opaque, S: v.S}
		}
		return Pattern{Kind: CIDR, Prefix: v.Prefix.Masked()}
	case policy.Port:
		return Pattern{Kind: Port, Port: v.Port}
	}
	return Pattern{Kind: Opaque, S: v.S}
}

// NeverMatches reports whether rule r of a policy with action a is proved
// to match no request, HTTP or TCP.
func NeverMatches(a policy.Action, r policy.Rule) bool {
	return Compile(a, r, HTTP).NeverMatches() && Compile(a, r, TCP).NeverMatches()
}

// NeverMatches reports whether the rule is proved to match no request of
// its protocol.
func (r Rule) NeverMatches() bool {
	if r.TooBig {
		return false
	}
	for _, c := range r.Conjs {
		if c.Satisfiable() {
			return false
		}
	}
	return true
}

// Covers reports whether every request that o matches is proved to match r
// too. Both must be compiled for the same protocol.
func (r Rule) Covers(o Rule) bool {
	if r.TooBig || o.TooBig {
		return false
	}
	budget := maxSplits
	for _, oc := range o.Conjs {
		if !coveredBy(oc, r.Conjs, &budget) {
			return false
		}
	}
	return true
}

// maxSplits bounds the case splits of one Covers.
const maxSplits = 256

// coveredBy reports whether every request satisfying c satisfies one of
// ds: c implies one of them, or, split on a literal with several patterns
// (In(k, p1, p2) is In(k, p1) or In(k, p2)), each case is covered.
func coveredBy(c Conj, ds []Conj, budget *int) bool {
	if !c.Satisfiable() {
		return true
	}
	for _, d := range ds {
		if c.ImpliesAll(d) {
			return true
		}
	}
	for i, l := range c {
		if l.Op != In || len(l.Patterns) < 2 {
			continue
		}
		if *budget < len(l.Patterns) {
			return false
		}
		*budget -= len(l.Patterns)
		for _, p := range l.Patterns {
			one := l
			one.Patterns = []Pattern{p}
			split := append(append(append(Conj{}, c[:i]...), one), c[i+1:]...)
			if !coveredBy(split, ds, budget) {
				return false
			}
		}
		return true
	}
	return false
}

// Covers reports whether every request, HTTP or TCP, that rule o of a
// policy with action oa matches is proved to match rule r of a policy with
// action ra too.
//
// Both protocols are checked, though for a DENY r and an ALLOW o the HTTP
// case decides: an ALLOW rule with HTTP-only fields matches no TCP request
// (nothing to cover), and one without them reads no HTTP-only attribute,
// so for any TCP request it matches, the HTTP request with the same
// connection attributes (and remote.ip equal to the peer's) matches it too,
// hence matches r, hence matches r's TCP form, which only drops HTTP-only
// fields and so matches more. Checking TCP as well costs little and keeps
// Covers right for any pair of actions.
func Covers(ra policy.Action, r policy.Rule, oa policy.Action, o policy.Rule) bool {
	for _, p := range []Proto{HTTP, TCP} {
		if !Compile(ra, r, p).Covers(Compile(oa, o, p)) {
			return false
		}
	}
	return true
}

// Satisfiable reports whether some request may satisfy every literal of c:
// false is a proof that none does.
func (c Conj) Satisfiable() bool { return c.Conflict() == nil }

// Conflict returns the literals of the first key of c that no value
// satisfies together: why c is proved unsatisfiable. It is nil when c is
// not proved unsatisfiable.
func (c Conj) Conflict() []Literal {
	byKey := map[Key][]Literal{}
	var keys []Key
	for _, l := range c {
		if _, ok := byKey[l.Key]; !ok {
			keys = append(keys, l.Key)
		}
		byKey[l.Key] = append(byKey[l.Key], l)
	}
	for _, k := range keys {
		if !keySatisfiable(k, byKey[k]) {
			return byKey[k]
		}
	}
	if l := regexpConflict(c); l != nil {
		return l
	}
	return peerConflict(c)
}

// Implies reports whether every request that satisfies c is proved to
// satisfy l.
func (c Conj) Implies(l Literal) bool {
	for _, n := range Negate(l) {
		if append(c[:len(c):len(c)], n...).Satisfiable() {
			return false
		}
	}
	return true
}

// ImpliesAll reports whether c implies every literal of d.
func (c Conj) ImpliesAll(d Conj) bool {
	for _, l := range d {
		if !c.Implies(l) {
			return false
		}
	}
	return true
}

// Negate returns the negation of l as a disjunction of conjunctions.
func Negate(l Literal) []Conj {
	n := Literal{Key: l.Key, Patterns: l.Patterns}
	switch l.Op {
	case In:
		n.Op = NotIn
		return []Conj{{n}}
	case NotIn:
		n.Op = In
		return []Conj{{n}}
	}
	// Not (present and none matches): absent, or some matches.
	n.Op = In
	absent := Literal{Key: l.Key, Op: NotIn, Patterns: []Pattern{{Kind: Any}}}
	return []Conj{{absent}, {n}}
}

// keySatisfiable decides whether some value of one key (or its absence)
// satisfies every literal: false is a proof that none does.
func keySatisfiable(k Key, lits []Literal) bool {
	var pos [][]Pattern // one set per In literal
	var neg []Pattern   // NotIn and PresentNotIn patterns, ORed
	mustBePresent := false
	for _, l := range lits {
		switch l.Op {
		case In:
			mustBePresent = true
			var known []Pattern
			opaque := false
			for _, p := range l.Patterns {
				if p.Kind == Opaque {
					opaque = true
				}
				known = append(known, p)
			}
			if opaque {
				// Matching something unknown: at least present.
				known = []Pattern{{Kind: Any}}
			}
			pos = append(pos, known)
		case PresentNotIn:
			mustBePresent = true
			fallthrough
		case NotIn:
			for _, p := range l.Patterns {
				// An opaque pattern excludes something unknown:
				// dropping it only widens the literal.
				if p.Kind != Opaque {
					neg = append(neg, p)
				}
			}
		}
	}
	if !mustBePresent {
		return true // the attribute may be absent
	}
	if k.View == PeerRegexp {
		return regexpSatisfiable(pos, neg)
	}
	switch k.Attr {
	case policy.SourceIP, policy.RemoteIP, policy.DestinationIP:
		return ipSatisfiable(pos, neg)
	case policy.DestinationPort:
		return portSatisfiable(pos, neg)
	}
	return stringSatisfiable(pos, neg)
}

// regexpSatisfiable decides the PeerRegexp view. A SPIFFE ID may match
// several of Istio's expressions at once, so positive literals are never
// intersected: the only proof is a positive literal whose every pattern is
// included in a negated one, since the ID matching it at some position
// then matches the negated one there too.
func regexpSatisfiable(pos [][]Pattern, neg []Pattern) bool {
	for _, ps := range pos {
		all := true
		for _, p := range ps {
			if !includedIn(p, neg, true) {
				all = false
				break
			}
		}
		if all {
			return false
		}
	}
	return true
}

// includedIn reports whether every string p matches is matched by some
// pattern of ns. With regexp, the patterns are parts of Istio's regular
// expressions, whose ".*" does not match a newline; a string holding one
// is then included only in the very same pattern.
func includedIn(p Pattern, ns []Pattern, regexp bool) bool {
	for _, n := range ns {
		if p.Kind == n.Kind && p.S == n.S && p.Kind != Opaque {
			return true
		}
		if regexp && strings.Contains(p.S, "\n") {
			continue
		}
		if stringIncluded(p, n) {
			return true
		}
	}
	return false
}

func stringIncluded(p, n Pattern) bool {
	switch n.Kind {
	case Any:
		return p.Kind != Opaque
	case NonEmpty:
		switch p.Kind {
		case NonEmpty:
			return true
		case Exact, Prefix, Suffix:
			return p.S != ""
		}
	case Exact:
		return p.Kind == Exact && p.S == n.S
	case Prefix:
		return (p.Kind == Exact || p.Kind == Prefix) && strings.HasPrefix(p.S, n.S)
	case Suffix:
		return (p.Kind == Exact || p.Kind == Suffix) && strings.HasSuffix(p.S, n.S)
	}
	return false
}

// maxCombos bounds the choices of one pattern per positive literal.
const maxCombos = 1024

// combos calls fn with each choice of one pattern per set until fn
// returns true; it returns whether fn did, and true (no proof) when there
// are too many choices.
func combos(sets [][]Pattern, fn func([]Pattern) bool) bool {
	n := 1
	for _, s := range sets {
		n *= len(s)
		if n > maxCombos {
			return true
		}
	}
	if n == 0 {
		return false // some In literal has no patterns: matches nothing
	}
	pick := make([]Pattern, len(sets))
	var rec func(i int) bool
	rec = func(i int) bool {
		if i == len(sets) {
			return fn(pick)
		}
		for _, p := range sets[i] {
			pick[i] = p
			if rec(i + 1) {
				return true
			}
		}
		return false
	}
	return rec(0)
}

// stringSatisfiable decides whether one string (present, possibly empty)
// matches a pattern of every positive set and no negated pattern.
func stringSatisfiable(pos [][]Pattern, neg []Pattern) bool {
	if len(pos) == 0 {
		pos = [][]Pattern{{{Kind: Any}}}
	}
	for _, ps := range pos {
		for _, p := range ps {
			if p.Kind == CIDR || p.Kind == Port {
				return true // not a string: no proof
			}
		}
	}
	for _, p := range neg {
		if p.Kind == CIDR || p.Kind == Port {
			return true
		}
	}
	return combos(pos, func(pick []Pattern) bool { return stringPickSatisfiable(pick, neg) })
}

func matchString(p Pattern, v string) bool {
	switch p.Kind {
	case Exact:
		return v == p.S
	case Prefix:
		return strings.HasPrefix(v, p.S)
	case Suffix:
		return strings.HasSuffix(v, p.S)
	case NonEmpty:
		return v != ""
	case Any:
		return true
	}
	return false
}

func stringPickSatisfiable(pick, neg []Pattern) bool {
	var (
		pre, suf string
		nonEmpty bool
	)
	for _, p := range pick {
		switch p.Kind {
		case Exact:
			// One value: decide it exactly.
			for _, q := range pick {
				if !matchString(q, p.S) {
					return false
				}
			}
			for _, q := range neg {
				if matchString(q, p.S) {
					return false
				}
			}
			return true
		case Prefix:
			switch {
			case strings.HasPrefix(p.S, pre):
				pre = p.S
			case !strings.HasPrefix(pre, p.S):
				return false
			}
		case Suffix:
			switch {
			case strings.HasSuffix(p.S, suf):
				suf = p.S
			case !strings.HasSuffix(suf, p.S):
				return false
			}
		case NonEmpty:
			nonEmpty = true
		}
	}
	// Every value with prefix pre and suffix suf (non-empty if asked)
	// matches the pick. The value pre+x+suf, with x longer than every
	// negated string and starting and ending with a byte none of them
	// holds, is matched by a negated pattern only if that pattern is Any,
	// NonEmpty, a prefix of pre or a suffix of suf; and those exclude
	// every such value (but "" from NonEmpty).
	fresh, ok := freshByte(neg)
	if !ok {
		return true
	}
	long := strings.Repeat(string([]byte{fresh}), 2)
	for _, q := range neg {
		if len(q.S) >= len(long) {
			long = strings.Repeat(string([]byte{fresh}), len(q.S)+2)
		}
	}
	w := pre + long + suf
	killed := false
	for _, q := range neg {
		if matchString(q, w) {
			killed = true
			break
		}
	}
	if !killed {
		return true
	}
	// Only an empty value can still escape (a NonEmpty negation).
	if pre != "" || suf != "" || nonEmpty {
		return false
	}
	for _, q := range neg {
		if matchString(q, "") {
			return false
		}
	}
	return true
}

// freshByte returns a byte that no pattern string holds.
func freshByte(ps []Pattern) (byte, bool) {
	var used [256]bool
	for _, p := range ps {
		for i := 0; i < len(p.S); i++ {
			used[p.S[i]] = true
		}
	}
	for b := 'a'; b < 256; b++ {
		if !used[b] {
			return byte(b), true
		}
	}
	for b := 0; b < 'a'; b++ {
		if !used[b] {
			return byte(b), true
		}
	}
	return 0, false
}

// ipSatisfiable decides whether one address lies in a block of every
// positive set and in no negated block.
func ipSatisfiable(pos [][]Pattern, neg []Pattern) bool {
	var negs []netip.Prefix
	for _, p := range neg {
		switch p.Kind {
		case CIDR:
			negs = append(negs, p.Prefix)
		case Any, NonEmpty:
			return false // every present address is excluded
		default:
			return true
		}
	}
	if len(pos) == 0 {
		// A present address outside both families (an IPv6 zone, which
		// OPA's net.cidr_contains does not parse) is in no block.
		return true
	}
	return combos(pos, func(pick []Pattern) bool {
		var q netip.Prefix
		for _, p := range pick {
			switch p.Kind {
			case CIDR:
			case Any, NonEmpty:
				continue
			default:
				return true // not an address pattern: no proof
			}
			switch {
			case !q.IsValid():
				q = p.Prefix
			case q.Contains(p.Prefix.Addr()) && q.Bits() <= p.Prefix.Bits():
				q = p.Prefix
			case p.Prefix.Contains(q.Addr()) && p.Prefix.Bits() <= q.Bits():
			default:
				return false // disjoint blocks (or families)
			}
		}
		if !q.IsValid() {
			return true // any present address, as above
		}
		return !covered(q, negs)
	})
}

// covered reports whether every address of q lies in some block of ns.
func covered(q netip.Prefix, ns []netip.Prefix) bool {
	var inner []netip.Prefix
	for _, n := range ns {
		if n.Addr().BitLen() != q.Addr().BitLen() {
			continue
		}
		if n.Bits() <= q.Bits() && n.Contains(q.Addr()) {
			return true
		}
		if n.Bits() > q.Bits() && q.Contains(n.Addr()) {
			inner = append(inner, n)
		}
	}
	if len(inner) == 0 || q.Bits() >= q.Addr().BitLen() {
		return false
	}
	lo := netip.PrefixFrom(q.Addr(), q.Bits()+1)
	hi := netip.PrefixFrom(flipBit(q.Addr(), q.Bits()), q.Bits()+1)
	return covered(lo, inner) && covered(hi, inner)
}

func flipBit(a netip.Addr, bit int) netip.Addr {
	b := a.AsSlice()
	b[bit/8] ^= 0x80 >> (bit % 8)
	out, _ := netip.AddrFromSlice(b)
	return out
}

// portSatisfiable decides whether one port is in every positive set and in
// no negated one.
func portSatisfiable(pos [][]Pattern, neg []Pattern) bool {
	excluded := map[int]bool{}
	for _, p := range neg {
		if p.Kind != Port {
			return true
		}
		excluded[p.Port] = true
	}
	if len(pos) == 0 {
		// The port of a check is any uint32; policies name 0-65535.
		return true
	}
	var cand map[int]bool
	for _, ps := range pos {
		set := map[int]bool{}
		for _, p := range ps {
			switch p.Kind {
			case Port:
				set[p.Port] = true
			case Any, NonEmpty:
				// any port: no narrowing
				set = nil
			default:
				return true
			}
			if set == nil {
				break
			}
		}
		if set == nil {
			continue
		}
		if cand == nil {
			cand = set
			continue
		}
		for p := range cand {
			if !set[p] {
				delete(cand, p)
			}
		}
	}
	if cand == nil {
		return true
	}
	for p := range cand {
		if !excluded[p] {
			return true
		}
	}
	return false
}
