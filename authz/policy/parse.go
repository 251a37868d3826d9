package policy

import (
	"errors"
	"fmt"
	"net/netip"
	"regexp"
	"sort"
	"strconv"
	"strings"

	"google.golang.org/protobuf/reflect/protoreflect"
	securityv1beta1 "istio.io/api/security/v1beta1"
	securityclientv1 "istio.io/client-go/pkg/apis/security/v1"
	securityclientv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
)

// DryRunAnnotation marks a policy that is evaluated and logged but not
// enforced.
const DryRunAnnotation = "istio.io/dry-run"

// Sentinel errors wrapped by *FieldError.
var (
	// ErrUnsupported marks a field trustmesh does not implement.
	ErrUnsupported = errors.New("not supported")
	// ErrInvalid marks a field whose value is invalid.
	ErrInvalid = errors.New("invalid")
)

// FieldError is a refusal of one field of one policy.
type FieldError struct {
	Origin string // file or object
	Policy string // namespace/name
	Field  string // e.g. "spec.rules[0].from[0].source.requestPrincipals"
	// Line is the line of the file that holds the field, when the policy
	// came from a file; 0 otherwise.
	Line int
	Err  error // wraps ErrUnsupported or ErrInvalid
}

func (e *FieldError) Error() string {
	if e.Line > 0 {
		return fmt.Sprintf("policy: %s, line %d: %s: %s: %v", e.Origin, e.Line, e.Policy, e.Field, e.Err)
	}
	return fmt.Sprintf("policy: %s: %s: %s: %v", e.Origin, e.Policy, e.Field, e.Err)
}

func (e *FieldError) Unwrap() error { return e.Err }

// Meta is the object metadata the model needs.
type Meta struct {
	Namespace   string
	Name        string
	Annotations map[string]string
	// Origin names the file or object, for errors.
	Origin string
}

// FromV1 converts a security.istio.io/v1 object, as an informer delivers it.
func FromV1(obj *securityclientv1.AuthorizationPolicy, origin string) (*Policy, error) {
	return FromSpec(Meta{Namespace: obj.Namespace, Name: obj.Name, Annotations: obj.Annotations, Origin: origin}, &obj.Spec)
}

// FromV1beta1 converts a security.istio.io/v1beta1 object.
func FromV1beta1(obj *securityclientv1beta1.AuthorizationPolicy, origin string) (*Policy, error) {
	return FromSpec(Meta{Namespace: obj.Namespace, Name: obj.Name, Annotations: obj.Annotations, Origin: origin}, &obj.Spec)
}

// FromSpec validates spec and converts it into the model. The error joins a
// *FieldError for every refused field.
func FromSpec(meta Meta, spec *securityv1beta1.AuthorizationPolicy) (*Policy, error) {
	c := &converter{meta: meta}
	p := &Policy{Namespace: meta.Namespace, Name: meta.Name, Origin: meta.Origin}
	if meta.Name == "" {
		c.fail("metadata.name", ErrInvalid, "must be set")
	}
	if meta.Namespace == "" {
		c.fail("metadata.namespace", ErrInvalid, "must be set")
	}
	if fe := c.budget(spec.GetRules()); fe != nil {
		// Refused before anything else is read: the cost of a policy (its
		// generated Rego and path regexps, compiled at every load and
		// admission review and evaluated at every request) grows with its
		// size, and a refusal per field would too.
		c.errs = append(c.errs, fe)
		return nil, errors.Join(c.errs...)
	}
	c.checkFields(spec.ProtoReflect(), "spec")

	switch spec.GetAction() {
	case securityv1beta1.AuthorizationPolicy_ALLOW:
		p.Action = Allow
	case securityv1beta1.AuthorizationPolicy_DENY:
		p.Action = Deny
	case securityv1beta1.AuthorizationPolicy_AUDIT:
		p.Action = Audit
	case securityv1beta1.AuthorizationPolicy_CUSTOM:
		p.Action = Custom
	default:
		c.fail("spec.action", ErrInvalid, "unknown action %v", spec.GetAction())
	}
	if prov := spec.GetProvider(); prov != nil {
		if p.Action != Custom {
			c.fail("spec.provider", ErrInvalid, "may only be set with action CUSTOM")
		}
		p.Provider = prov.GetName()
	}
	if p.Action == Custom && p.Provider == "" {
		c.fail("spec.provider.name", ErrInvalid, "action CUSTOM needs a provider")
	}

	if v, ok := meta.Annotations[DryRunAnnotation]; ok {
		switch v {
		case "true":
			p.DryRun = true
		case "false":
		default:
			c.fail("metadata.annotations["+DryRunAnnotation+"]", ErrInvalid, "must be \"true\" or \"false\", not %q", v)
		}
		if p.DryRun && p.Action == Custom {
			c.fail("metadata.annotations["+DryRunAnnotation+"]", ErrUnsupported, "dry-run is not supported for CUSTOM policies, as in Istio")
		}
	}

	if sel := spec.GetSelector(); sel != nil {
		p.Selector = make(map[string]string, len(sel.GetMatchLabels()))
		for k, v := range sel.GetMatchLabels() {
			if k == "" {
				c.fail("spec.selector.matchLabels", ErrInvalid, "empty label key")
			}
			p.Selector[k] = v
		}
	}

	for i, r := range spec.GetRules() {
		p.Rules = append(p.Rules, c.rule(fmt.Sprintf("spec.rules[%d]", i), r))
	}
	if len(c.errs) > 0 {
		return nil, errors.Join(c.errs...)
	}
	return p, nil
}

// The bounds on one policy. Checking a policy compiles its generated Rego
// and path regexps, at every load and admission review, and ext_authz
// evaluates them at every request to a selected workload, in time that
// grows with the policy's size, the length of its values and the
// operators of its path templates. At the bounds a review takes well under
// a second and a Check milliseconds; no policy written by hand comes near
// them. A larger policy is refused, with one error naming the field and
// saying to split or simplify it, before the rest of it is read.
const (
	// MaxValues bounds the entries one policy's rules hold: each rule,
	// each from, to and when entry, each value of a list such as
	// principals, paths or a condition's values, and each {*} or {**}
	// operator of a path template counts one.
	MaxValues = 1024
	// MaxValueBytes bounds the bytes of one value or condition key.
	MaxValueBytes = 1024
	// MaxPolicyBytes bounds the bytes of all values and condition keys of
	// one policy's rules.
	MaxPolicyBytes = 64 << 10
	// MaxTemplateOperators bounds the {*} and {**} operators of one path
	// template; each also counts toward MaxValues.
	MaxTemplateOperators = 16
)

// budget checks the rules against the bounds, counting as it goes so that
// it stops at the first one exceeded, and returns its refusal or nil.
func (c *converter) budget(rules []*securityv1beta1.Rule) *FieldError {
	b := &budget{}
	b.n = len(rules)
	for i, r := range rules {
		if b.n > MaxValues {
			break
		}
		b.walk(r.ProtoReflect(), func() string { return fmt.Sprintf("spec.rules[%d]", i) })
		if b.field != nil {
			break
		}
	}
	fail := func(field, format string, args ...any) *FieldError {
		return &FieldError{Origin: c.meta.Origin, Policy: c.meta.Namespace + "/" + c.meta.Name, Field: field,
			Err: fmt.Errorf("%w: %s", ErrInvalid, fmt.Sprintf(format, args...))}
	}
	switch {
	case b.n > MaxValues:
		return fail("spec.rules", "holds more than %d rules, from, to and when entries, values and path template operators, the most one policy may hold: split it into several policies", MaxValues)
	case b.bytes > MaxPolicyBytes:
		return fail("spec.rules", "its values hold more than %d bytes, the most one policy may hold: split it into several policies", MaxPolicyBytes)
	case b.field != nil:
		return fail(b.field(), "%s", b.why)
	}
	return nil
}

type budget struct {
	n, bytes int
	field    func() string // the field refused on its own, if any
	why      string
}

// walk adds m's entries and bytes, however deep, and stops once a bound is
// exceeded. path names m; it is built only for a refusal.
func (b *budget) walk(m protoreflect.Message, path func() string) {
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := func() string { return path() + "." + fd.JSONName() }
		switch {
		case fd.IsMap():
			b.n += v.Map().Len()
		case fd.IsList() && fd.Kind() == protoreflect.MessageKind:
			for i, l := 0, v.List(); i < l.Len() && b.ok(); i++ {
				b.n++
				b.walk(l.Get(i).Message(), func() string { return fmt.Sprintf("%s[%d]", name(), i) })
			}
		case fd.IsList():
			l := v.List()
			b.n += l.Len()
			for i := 0; i < l.Len() && b.ok(); i++ {
				if fd.Kind() == protoreflect.StringKind {
					b.value(l.Get(i).String(), fd.Name() == "paths" || fd.Name() == "not_paths",
						func() string { return fmt.Sprintf("%s[%d]", name(), i) })
				}
			}
		case fd.Kind() == protoreflect.MessageKind:
			b.walk(v.Message(), name)
		case fd.Kind() == protoreflect.StringKind:
			b.value(v.String(), false, name)
		}
		return b.ok()
	})
}

func (b *budget) ok() bool { return b.n <= MaxValues && b.bytes <= MaxPolicyBytes && b.field == nil }

// value adds one value's bytes and checks its length and, for a path, its
// template operators.
func (b *budget) value(s string, path bool, field func() string) {
	b.bytes += len(s)
	switch {
	case len(s) > MaxValueBytes:
		b.field, b.why = field, fmt.Sprintf("a value of %d bytes, more than the %d one value may hold: simplify it", len(s), MaxValueBytes)
	case path:
		ops := strings.Count(s, "{*}") + strings.Count(s, "{**}")
		b.n += ops
		if ops > MaxTemplateOperators {
			b.field, b.why = field, fmt.Sprintf("a path template of more than %d {*} and {**} operators: simplify it, or split the path into several", MaxTemplateOperators)
		}
	}
}

type converter struct {
	meta Meta
	errs []error
}

func (c *converter) fail(field string, kind error, format string, args ...any) {
	c.errs = append(c.errs, &FieldError{
		Origin: c.meta.Origin,
		Policy: c.meta.Namespace + "/" + c.meta.Name,
		Field:  field,
		Err:    fmt.Errorf("%w: %s", kind, fmt.Sprintf(format, args...)),
	})
}

// implemented lists, per message, the fields the model maps exactly.
var implemented = map[protoreflect.FullName]map[protoreflect.Name]bool{
	"istio.security.v1beta1.AuthorizationPolicy":                   {"selector": true, "rules": true, "action": true, "provider": true},
	"istio.security.v1beta1.AuthorizationPolicy.ExtensionProvider": {"name": true},
	"istio.type.v1beta1.WorkloadSelector":                          {"match_labels": true},
	"istio.security.v1beta1.Rule":                                  {"from": true, "to": true, "when": true},
	"istio.security.v1beta1.Rule.From":                             {"source": true},
	"istio.security.v1beta1.Rule.To":                               {"operation": true},
	"istio.security.v1beta1.Source": {
		"principals": true, "not_principals": true, "namespaces": true, "not_namespaces": true,
		"service_accounts": true, "not_service_accounts": true, "ip_blocks": true, "not_ip_blocks": true,
		"remote_ip_blocks": true, "not_remote_ip_blocks": true, "trust_domains": true, "not_trust_domains": true,
	},
	"istio.security.v1beta1.Operation": {
		"hosts": true, "not_hosts": true, "ports": true, "not_ports": true,
		"methods": true, "not_methods": true, "paths": true, "not_paths": true,
	},
	"istio.security.v1beta1.Condition": {"key": true, "values": true, "not_values": true},
}

// refusedWhy explains the fields that are refused on purpose.
var refusedWhy = map[protoreflect.Name]string{
	"target_ref":             "attaching policies to gateways or services (targetRef) is not implemented; use selector",
	"target_refs":            "attaching policies to gateways or services (targetRefs) is not implemented; use selector",
	"request_principals":     "needs request authentication (JWT), which trustmesh does not implement yet",
	"not_request_principals": "needs request authentication (JWT), which trustmesh does not implement yet",
}

// checkFields refuses every populated field the model does not implement,
// including fields added to istio.io/api after this code was written.
func (c *converter) checkFields(m protoreflect.Message, path string) {
	known := implemented[m.Descriptor().FullName()]
	if len(m.GetUnknown()) > 0 {
		c.fail(path, ErrUnsupported, "unknown fields")
	}
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		name := path + "." + fd.JSONName()
		if !known[fd.Name()] {
			why, ok := refusedWhy[fd.Name()]
			if !ok {
				why = "field is not implemented by trustmesh"
			}
			c.fail(name, ErrUnsupported, "%s", why)
			return true
		}
		if fd.Kind() != protoreflect.MessageKind || fd.IsMap() {
			return true
		}
		if fd.IsList() {
			l := v.List()
			for i := 0; i < l.Len(); i++ {
				c.checkFields(l.Get(i).Message(), fmt.Sprintf("%s[%d]", name, i))
			}
			return true
		}
		c.checkFields(v.Message(), name)
		return true
	})
}

func (c *converter) rule(path string, r *securityv1beta1.Rule) Rule {
	var out Rule
	if r == nil {
		return out
	}
	for i, f := range r.GetFrom() {
		p := fmt.Sprintf("%s.from[%d].source", path, i)
		s := f.GetSource()
		if s == nil {
			c.fail(p, ErrInvalid, "must be set")
			continue
		}
		m := c.source(p, s)
		if len(m) == 0 {
			c.fail(p, ErrInvalid, "must not be empty")
		}
		out.From = append(out.From, m)
	}
	for i, t := range r.GetTo() {
		p := fmt.Sprintf("%s.to[%d].operation", path, i)
		o := t.GetOperation()
		if o == nil {
			c.fail(p, ErrInvalid, "must be set")
			continue
		}
		m := c.operation(p, o)
		if len(m) == 0 {
			c.fail(p, ErrInvalid, "must not be empty")
		}
		out.To = append(out.To, m)
	}
	for i, w := range r.GetWhen() {
		out.When = append(out.When, c.condition(fmt.Sprintf("%s.when[%d]", path, i), w)...)
	}
	return out
}

func (c *converter) source(path string, s *securityv1beta1.Source) Match {
	var m Match
	add := func(name string, attr Attribute, not bool, vals []string, kind func(string, string) (Value, error)) {
		if len(vals) == 0 {
			return
		}
		m = append(m, c.field(path+"."+name, attr, "", not, vals, kind))
	}
	if (len(s.GetServiceAccounts()) > 0 || len(s.GetNotServiceAccounts()) > 0) &&
		(len(s.GetPrincipals()) > 0 || len(s.GetNotPrincipals()) > 0 || len(s.GetNamespaces()) > 0 || len(s.GetNotNamespaces()) > 0) {
		c.fail(path+".serviceAccounts", ErrInvalid, "cannot be set with principals or namespaces")
	}
	add("principals", SourcePrincipal, false, s.GetPrincipals(), stringValue)
	add("notPrincipals", SourcePrincipal, true, s.GetNotPrincipals(), stringValue)
	add("namespaces", SourceNamespace, false, s.GetNamespaces(), stringValue)
	add("notNamespaces", SourceNamespace, true, s.GetNotNamespaces(), stringValue)
	sa := c.serviceAccountValue
	add("serviceAccounts", SourceServiceAccount, false, s.GetServiceAccounts(), sa)
	add("notServiceAccounts", SourceServiceAccount, true, s.GetNotServiceAccounts(), sa)
	add("trustDomains", SourceTrustDomain, false, s.GetTrustDomains(), stringValue)
	add("notTrustDomains", SourceTrustDomain, true, s.GetNotTrustDomains(), stringValue)
	add("ipBlocks", SourceIP, false, s.GetIpBlocks(), cidrValue)
	add("notIpBlocks", SourceIP, true, s.GetNotIpBlocks(), cidrValue)
	add("remoteIpBlocks", RemoteIP, false, s.GetRemoteIpBlocks(), cidrValue)
	add("notRemoteIpBlocks", RemoteIP, true, s.GetNotRemoteIpBlocks(), cidrValue)
	return m
}

func (c *converter) operation(path string, o *securityv1beta1.Operation) Match {
	var m Match
	add := func(name string, attr Attribute, not bool, vals []string, kind func(string, string) (Value, error)) {
		if len(vals) == 0 {
			return
		}
		m = append(m, c.field(path+"."+name, attr, "", not, vals, kind))
	}
	add("hosts", Host, false, o.GetHosts(), hostValue)
	add("notHosts", Host, true, o.GetNotHosts(), hostValue)
	add("ports", DestinationPort, false, o.GetPorts(), portValue)
	add("notPorts", DestinationPort, true, o.GetNotPorts(), portValue)
	add("methods", Method, false, o.GetMethods(), stringValue)
	add("notMethods", Method, true, o.GetNotMethods(), stringValue)
	add("paths", Path, false, o.GetPaths(), pathValue)
	add("notPaths", Path, true, o.GetNotPaths(), pathValue)
	return m
}

// conditionKeys maps the implemented `when` keys to their attributes and
// value parsers. Istio ignores unknown keys; trustmesh refuses them.
var conditionKeys = map[string]struct {
	attr  Attribute
	value func(string, string) (Value, error)
}{
	"source.ip":          {SourceIP, cidrValue},
	"remote.ip":          {RemoteIP, cidrValue},
	"source.namespace":   {SourceNamespace, stringValue},
	"source.principal":   {SourcePrincipal, stringValue},
	"destination.ip":     {DestinationIP, cidrValue},
	"destination.port":   {DestinationPort, portValue},
	"connection.sni":     {SNI, stringValue},
	"request.headers[*]": {Header, stringValue},
}

func (c *converter) condition(path string, w *securityv1beta1.Condition) []Field {
	key := w.GetKey()
	lookup, header := key, ""
	if strings.HasPrefix(key, "request.headers[") && strings.HasSuffix(key, "]") {
		header = strings.ToLower(strings.TrimSuffix(strings.TrimPrefix(key, "request.headers["), "]"))
		lookup = "request.headers[*]"
		if header == "" {
			c.fail(path+".key", ErrInvalid, "empty header name in %q", key)
			return nil
		}
	}
	spec, ok := conditionKeys[lookup]
	if !ok {
		switch {
		case key == "":
			c.fail(path+".key", ErrInvalid, "must be set")
		case strings.HasPrefix(key, "request.auth."):
			c.fail(path+".key", ErrUnsupported, "%q needs request authentication (JWT), which trustmesh does not implement yet", key)
		default:
			c.fail(path+".key", ErrUnsupported, "%q is not a condition key trustmesh implements (Istio would ignore it; trustmesh refuses it rather than widen the policy)", key)
		}
		return nil
	}
	if len(w.GetValues()) == 0 && len(w.GetNotValues()) == 0 {
		c.fail(path, ErrInvalid, "at least one of values or notValues must be set")
		return nil
	}
	var out []Field
	if len(w.GetValues()) > 0 {
		out = append(out, c.field(path+".values", spec.attr, header, false, w.GetValues(), spec.value))
	}
	if len(w.GetNotValues()) > 0 {
		out = append(out, c.field(path+".notValues", spec.attr, header, true, w.GetNotValues(), spec.value))
	}
	return out
}

func (c *converter) field(path string, attr Attribute, header string, not bool, vals []string, parse func(string, string) (Value, error)) Field {
	f := Field{Name: path, Attr: attr, HeaderName: header, Not: not}
	for i, raw := range vals {
		v, err := parse(raw, c.meta.Namespace)
		if err != nil {
			c.fail(fmt.Sprintf("%s[%d]", path, i), ErrInvalid, "%v", err)
			continue
		}
		f.Values = append(f.Values, v)
	}
	return f
}

// stringValue parses Istio's exact, prefix ("abc*"), suffix ("*abc") and
// presence ("*") forms.
func stringValue(s, _ string) (Value, error) {
	switch {
	case s == "":
		return Value{}, errors.New("empty value")
	case s == "*":
		return Value{Kind: Presence}, nil
	case strings.Count(s, "*") > 1:
		return Value{}, fmt.Errorf("%q: '*' may only appear once, at the start or the end", s)
	case strings.HasPrefix(s, "*"):
		return Value{Kind: Suffix, S: s[1:]}, nil
	case strings.HasSuffix(s, "*"):
		return Value{Kind: Prefix, S: s[:len(s)-1]}, nil
	case strings.Contains(s, "*"):
		return Value{}, fmt.Errorf("%q: '*' may only appear at the start or the end", s)
	}
	return Value{Kind: Exact, S: s}, nil
}

// hostValue is a stringValue matched case-insensitively.
func hostValue(s, ns string) (Value, error) {
	return stringValue(strings.ToLower(s), ns)
}

// serviceAccountValue parses "namespace/name" or "name" (in the policy's
// namespace). No wildcards are allowed, as in Istio.
func (c *converter) serviceAccountValue(s, ns string) (Value, error) {
	if strings.Contains(s, "*") {
		return Value{}, fmt.Errorf("%q: wildcards are not allowed in serviceAccounts", s)
	}
	parts := strings.Split(s, "/")
	switch {
	case len(parts) == 1 && parts[0] != "":
		return Value{Kind: Exact, S: ns + "/" + parts[0]}, nil
	case len(parts) == 2 && parts[0] != "" && parts[1] != "":
		return Value{Kind: Exact, S: s}, nil
	}
	return Value{}, fmt.Errorf("%q: want <namespace>/<serviceaccount> or <serviceaccount>", s)
}

func cidrValue(s, _ string) (Value, error) {
	if strings.Contains(s, "/") {
		p, err := netip.ParsePrefix(s)
		if err != nil {
			return Value{}, fmt.Errorf("%q: %w", s, err)
		}
		return Value{Kind: CIDR, Prefix: p.Masked(), S: s}, nil
	}
	a, err := netip.ParseAddr(s)
	if err != nil {
		return Value{}, fmt.Errorf("%q: %w", s, err)
	}
	a = a.Unmap()
	return Value{Kind: CIDR, Prefix: netip.PrefixFrom(a, a.BitLen()), S: s}, nil
}

func portValue(s, _ string) (Value, error) {
	n, err := strconv.Atoi(s)
	if err != nil || n < 0 || n > 65535 || strconv.Itoa(n) != s {
		return Value{}, fmt.Errorf("%q: not a port number", s)
	}
	return Value{Kind: Port, Port: n, S: s}, nil
}

// pathValue parses a path: a path template if it holds {*} or {**},
// otherwise a stringValue.
func pathValue(s, ns string) (Value, error) {
	if !strings.Contains(s, "{") && !strings.Contains(s, "}") {
		return stringValue(s, ns)
	}
	re, err := templateRegexp(s)
	if err != nil {
		return Value{}, err
	}
	return Value{Kind: Template, S: s, Regexp: re}, nil
}

// templateRegexp validates a path template as Istio does and turns it into
// an anchored regular expression: {*} matches one non-empty path segment,
// {**} matches any run of characters, slashes included, and must be the
// last operator. No other characters may share a segment with an operator,
// and '*', '{' and '}' may not appear outside one.
func templateRegexp(s string) (string, error) {
	if !strings.HasPrefix(s, "/") {
		return "", fmt.Errorf("%q: a path template must start with '/'", s)
	}
	var b strings.Builder
	b.WriteString("^")
	segs := strings.Split(s[1:], "/")
	seenGlob := false
	for i, seg := range segs {
		b.WriteString("/")
		switch {
		case seg == "{*}" || seg == "{**}":
			if seenGlob {
				return "", fmt.Errorf("%q: {**} must be the last operator", s)
			}
			if seg == "{**}" {
				seenGlob = true
				b.WriteString(".*")
			} else {
				b.WriteString("[^/]+")
			}
		case strings.ContainsAny(seg, "{}*"):
			return "", fmt.Errorf("%q: segment %d: an operator must be a whole segment, and '*', '{', '}' may not appear outside one", s, i)
		default:
			b.WriteString(regexp.QuoteMeta(seg))
		}
	}
	b.WriteString("$")
	if _, err := regexp.Compile(b.String()); err != nil {
		return "", fmt.Errorf("%q: %w", s, err)
	}
	return b.String(), nil
}

// SortedLabels returns the selector's keys in order, for stable output.
func (p *Policy) SortedLabels() []string {
	keys := make([]string, 0, len(p.Selector))
	for k := range p.Selector {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}
