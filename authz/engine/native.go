package engine

import (
	"fmt"
	"net/netip"
	"regexp"
	"strings"

	"github.com/trustmesh/trustmesh/authz/policy"
)

// The native back end evaluates the typed model (authz/policy) directly:
// each rule is compiled once, at Build, into matchers over the request's
// parsed attributes. Its semantics are the Rego back end's (authz/rego),
// which the differential tests hold it to, field for field:
//
//   - an attribute the request lacks matches no value; a not* field holds
//     when no value matches, so also when the attribute is absent, except
//     for the peer attributes of an ALLOW policy, which a request without
//     a peer identity never matches, negated or not;
//   - outside ALLOW, namespaces and serviceAccounts are Istio's regexps on
//     the whole SPIFFE ID (policy.IstioPeerRegexp);
//   - hosts: an ALLOW hosts field matches the host as sent; everywhere
//     else the host is tried as sent and normalized (see authz/rego
//     hostField);
//   - a rule is compiled for HTTP and, through policy.Rule.ForTCP, for
//     TCP: an ALLOW rule with HTTP-only fields matches nothing on TCP, the
//     other actions drop those fields.

// nativePolicy is one policy compiled.
type nativePolicy struct {
	http []nativeRule
	tcp  []nativeRule
}

// nativeRule is one rule, for one protocol: one From entry, one To entry
// and every When field must match. An empty From or To matches anything.
type nativeRule struct {
	index int
	from  [][]nativeField
	to    [][]nativeField
	when  []nativeField
}

// fieldMode says how a field reads its attribute.
type fieldMode uint8

const (
	modePlain fieldMode = iota
	// modePeerRegexp: namespaces and serviceAccounts outside ALLOW, as
	// Istio's regexps on the whole SPIFFE ID.
	modePeerRegexp
	// The host modes (see authz/rego hostField).
	modeHostAllow     // ALLOW hosts: the host as sent
	modeHostAllowNot  // ALLOW notHosts: neither form listed
	modeHostEither    // hosts elsewhere: either form listed
	modeHostEitherNot // notHosts elsewhere: either form not listed
)

// nativeField is one field: its attribute matches if any value matches
// (or, with not, if none does).
type nativeField struct {
	attr   policy.Attribute
	header string
	not    bool
	mode   fieldMode
	// peerRequired: a negated field that, in an ALLOW policy, still needs
	// the request to have the attribute (a peer identity).
	peerRequired bool
	// exact holds the values of a field whose values are all exact
	// strings, when there are many; values holds them otherwise.
	exact  map[string]struct{}
	values []nativeValue
}

type nativeValue struct {
	kind   policy.ValueKind
	s      string
	re     *regexp.Regexp
	prefix netip.Prefix
	port   int
}

// exactSetMin is the number of exact values from which a field looks
// them up in a map rather than comparing each.
const exactSetMin = 8

func compileNative(p *policy.Policy) (*nativePolicy, error) {
	np := &nativePolicy{}
	for i, r := range p.Rules {
		hr, err := compileRule(i, r, p.Action)
		if err != nil {
			return nil, err
		}
		np.http = append(np.http, hr)
		if tr, ok := r.ForTCP(p.Action); ok {
			tr2, err := compileRule(i, tr, p.Action)
			if err != nil {
				return nil, err
			}
			np.tcp = append(np.tcp, tr2)
		}
	}
	return np, nil
}

func compileRule(i int, r policy.Rule, a policy.Action) (nativeRule, error) {
	nr := nativeRule{index: i}
	var err error
	if nr.from, err = compileMatches(r.From, a); err != nil {
		return nr, err
	}
	if nr.to, err = compileMatches(r.To, a); err != nil {
		return nr, err
	}
	nr.when, err = compileFields(r.When, a)
	return nr, err
}

func compileMatches(ms []policy.Match, a policy.Action) ([][]nativeField, error) {
	if len(ms) == 0 {
		return nil, nil
	}
	out := make([][]nativeField, len(ms))
	for i, m := range ms {
		fs, err := compileFields(m, a)
		if err != nil {
			return nil, err
		}
		// A match with no fields matches anything: a non-nil empty list.
		if fs == nil {
			fs = []nativeField{}
		}
		out[i] = fs
	}
	return out, nil
}

func compileFields(fs []policy.Field, a policy.Action) ([]nativeField, error) {
	var out []nativeField
	for _, f := range fs {
		nf, err := compileField(f, a)
		if err != nil {
			return nil, err
		}
		out = append(out, nf)
	}
	return out, nil
}

func compileField(f policy.Field, a policy.Action) (nativeField, error) {
	nf := nativeField{attr: f.Attr, header: f.HeaderName, not: f.Not}
	switch {
	case f.Attr == policy.Host && a == policy.Allow && !f.Not:
		nf.mode = modeHostAllow
	case f.Attr == policy.Host && a == policy.Allow:
		nf.mode = modeHostAllowNot
	case f.Attr == policy.Host && !f.Not:
		nf.mode = modeHostEither
	case f.Attr == policy.Host:
		nf.mode = modeHostEitherNot
	case a != policy.Allow && (f.Attr == policy.SourceNamespace || f.Attr == policy.SourceServiceAccount):
		nf.mode = modePeerRegexp
		for _, v := range f.Values {
			re, _ := policy.IstioPeerRegexp(f.Attr, v)
			c, err := regexp.Compile("^(?:" + re + ")$")
			if err != nil {
				return nf, fmt.Errorf("%s: %w", f.Name, err)
			}
			nf.values = append(nf.values, nativeValue{kind: policy.Template, re: c})
		}
		return nf, nil
	}
	nf.peerRequired = f.Not && f.Attr.NeedsPeer() && a == policy.Allow
	allExact := len(f.Values) >= exactSetMin
	for _, v := range f.Values {
		if v.Kind != policy.Exact {
			allExact = false
		}
	}
	if allExact {
		nf.exact = make(map[string]struct{}, len(f.Values))
		for _, v := range f.Values {
			nf.exact[v.S] = struct{}{}
		}
		return nf, nil
	}
	for _, v := range f.Values {
		nv := nativeValue{kind: v.Kind, s: v.S, port: v.Port}
		switch v.Kind {
		case policy.Template:
			c, err := regexp.Compile(v.Regexp)
			if err != nil {
				return nf, fmt.Errorf("%s: %w", f.Name, err)
			}
			nv.re = c
		case policy.CIDR:
			nv.prefix = v.Prefix
			// As net.IPNet reads it (OPA's net.cidr_contains): an IPv4-mapped
			// prefix of /96 or longer is the IPv4 prefix it maps.
			if pa := v.Prefix.Addr(); pa.Is4In6() && v.Prefix.Bits() >= 96 {
				nv.prefix = netip.PrefixFrom(pa.Unmap(), v.Prefix.Bits()-96)
			}
		}
		nf.values = append(nf.values, nv)
	}
	return nf, nil
}

// first returns the lowest index of a rule of p that matches r.
func (p *nativePolicy) first(r *request) (int, bool) {
	rules := p.tcp
	if r.http {
		rules = p.http
	}
	for i := range rules {
		if rules[i].match(r) {
			return rules[i].index, true
		}
	}
	return 0, false
}

// all calls fn with the index of every rule of p that matches r.
func (p *nativePolicy) all(r *request, fn func(int)) {
	rules := p.tcp
	if r.http {
		rules = p.http
	}
	for i := range rules {
		if rules[i].match(r) {
			fn(rules[i].index)
		}
	}
}

func (nr *nativeRule) match(r *request) bool {
	return anyMatch(nr.from, r) && anyMatch(nr.to, r) && allMatch(nr.when, r)
}

func anyMatch(ms [][]nativeField, r *request) bool {
	if ms == nil {
		return true
	}
	for _, m := range ms {
		if allMatch(m, r) {
			return true
		}
	}
	return false
}

func allMatch(fs []nativeField, r *request) bool {
	for i := range fs {
		if !fs[i].match(r) {
			return false
		}
	}
	return true
}

func (f *nativeField) match(r *request) bool {
	switch f.mode {
	case modePeerRegexp:
		// The whole SPIFFE ID as sent: "spiffe://" + source.principal.
		hit := r.hasSource && f.anyString(r.srcPrincipal)
		return hit != f.not
	case modeHostAllow:
		return r.http && f.anyString(r.host)
	case modeHostAllowNot:
		return !(r.http && (f.anyString(r.host) || f.anyString(r.hostNorm)))
	case modeHostEither:
		return r.http && (f.anyString(r.host) || f.anyString(r.hostNorm))
	case modeHostEitherNot:
		return !r.http || !f.anyString(r.host) || !f.anyString(r.hostNorm)
	}
	present, hit := f.eval(r)
	if !f.not {
		return hit
	}
	if f.peerRequired && !present {
		return false
	}
	return !hit
}

// eval reads f's attribute from r: whether r has it, and whether a value
// matches it.
func (f *nativeField) eval(r *request) (present, hit bool) {
	switch f.attr {
	case policy.SourcePrincipal:
		return r.hasSource, r.hasSource && f.anyString(r.source.Principal)
	case policy.SourceTrustDomain:
		ok := r.hasSource && r.source.TrustDomain != ""
		return ok, ok && f.anyString(r.source.TrustDomain)
	case policy.SourceNamespace:
		ok := r.hasSource && r.source.Namespace != ""
		return ok, ok && f.anyString(r.source.Namespace)
	case policy.SourceServiceAccount:
		ok := r.hasSource && r.source.Namespace != ""
		return ok, ok && f.anyJoined(r.source.Namespace, r.source.ServiceAccount)
	case policy.SourceIP:
		return r.sourceAddr.IsValid(), f.anyAddr(r.sourceAddr)
	case policy.RemoteIP:
		a := r.remoteAddr()
		return a.IsValid(), f.anyAddr(a)
	case policy.DestinationIP:
		return r.destAddr.IsValid(), f.anyAddr(r.destAddr)
	case policy.DestinationPort:
		return r.hasPort, r.hasPort && f.anyPort(r.destPort)
	case policy.SNI:
		return r.sni != "", r.sni != "" && f.anyString(r.sni)
	case policy.Method:
		return r.http, r.http && f.anyString(r.method)
	case policy.Path:
		return r.http, r.http && f.anyString(r.normPath())
	case policy.Header:
		v, ok := r.header(f.header)
		return ok, ok && f.anyString(v)
	}
	return false, false
}

// anyString reports whether a value matches s, which the request has.
func (f *nativeField) anyString(s string) bool {
	if f.exact != nil {
		_, ok := f.exact[s]
		return ok
	}
	for i := range f.values {
		if f.values[i].matchString(f.attr, s) {
			return true
		}
	}
	return false
}

func (v *nativeValue) matchString(a policy.Attribute, s string) bool {
	switch v.kind {
	case policy.Exact:
		return s == v.s
	case policy.Prefix:
		return strings.HasPrefix(s, v.s)
	case policy.Suffix:
		return strings.HasSuffix(s, v.s)
	case policy.Presence:
		// Headers and hosts: present at all (Envoy present_match); other
		// attributes: not empty.
		return a == policy.Header || a == policy.Host || s != ""
	case policy.Template:
		return v.re.MatchString(s)
	case policy.CIDR:
		ip, err := netip.ParseAddr(s)
		return err == nil && ip.Zone() == "" && v.prefix.Contains(ip)
	}
	// A port never equals a string.
	return false
}

// anyJoined is anyString(ns + "/" + sa) without building the string on
// the exact values serviceAccounts holds.
func (f *nativeField) anyJoined(ns, sa string) bool {
	if f.exact != nil {
		return f.anyString(ns + "/" + sa)
	}
	for i := range f.values {
		v := &f.values[i]
		if v.kind == policy.Exact {
			if len(v.s) == len(ns)+1+len(sa) && v.s[len(ns)] == '/' && v.s[:len(ns)] == ns && v.s[len(ns)+1:] == sa {
				return true
			}
			continue
		}
		if v.matchString(f.attr, ns+"/"+sa) {
			return true
		}
	}
	return false
}

// anyAddr reports whether a value matches the address; an absent address
// matches none.
func (f *nativeField) anyAddr(a netip.Addr) bool {
	if !a.IsValid() {
		return false
	}
	for i := range f.values {
		v := &f.values[i]
		switch v.kind {
		case policy.CIDR:
			// OPA's net.cidr_contains reads the address with net.ParseIP,
			// which takes no zone.
			if a.Zone() == "" && v.prefix.Contains(a) {
				return true
			}
		case policy.Presence:
			return true
		default:
			if v.matchString(f.attr, a.String()) {
				return true
			}
		}
	}
	if f.exact != nil {
		return f.anyString(a.String())
	}
	return false
}

func (f *nativeField) anyPort(p uint32) bool {
	for i := range f.values {
		v := &f.values[i]
		switch v.kind {
		case policy.Port:
			if v.port >= 0 && uint32(v.port) == p {
				return true
			}
		case policy.Presence:
			// `input["destination.port"] != ""`: a number is never "".
			return true
		}
	}
	return false
}
