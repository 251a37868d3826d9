package rbac_test

import (
	"errors"
	"flag"
	"net/netip"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	rbacv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	matcherv3 "github.com/envoyproxy/go-control-plane/envoy/type/matcher/v3"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/trustmesh/trustmesh/authz/casefile"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/pathnorm"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/rbac"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// conn is what Envoy's RBAC filter sees of a request.
type conn struct {
	peer     string // URI SAN of the peer certificate
	sourceIP netip.Addr
	remoteIP netip.Addr
	destIP   netip.Addr
	destPort uint32
	sni      string
	http     bool
	path     string
	headers  map[string]string // includes :authority and :method
}

func connOf(req *authv3.CheckRequest, normalizedPath string, gw engine.Gateways) conn {
	a := req.GetAttributes()
	c := conn{
		peer:     a.GetSource().GetPrincipal(),
		destPort: a.GetDestination().GetAddress().GetSocketAddress().GetPortValue(),
		sni:      a.GetTlsSession().GetSni(),
	}
	c.sourceIP, _ = netip.ParseAddr(a.GetSource().GetAddress().GetSocketAddress().GetAddress())
	c.destIP, _ = netip.ParseAddr(a.GetDestination().GetAddress().GetSocketAddress().GetAddress())
	c.remoteIP = c.sourceIP
	// remote_ip as the listener computes it: the proxy in front decides
	// which x-envoy-external-address counts, as ext_authz does.
	if h := a.GetRequest().GetHttp(); h != nil {
		c.http = true
		c.path = normalizedPath
		c.headers = map[string]string{":authority": h.GetHost(), ":method": h.GetMethod()}
		for k, v := range h.GetHeaders() {
			c.headers[strings.ToLower(k)] = v
		}
		c.remoteIP, _ = netip.ParseAddr(engine.RemoteIP(gw, a.GetDestination().GetPrincipal(), c.peer,
			c.sourceIP.String(), c.headers[engine.ExternalAddressHeader]))
	}
	return c
}

// A minimal evaluator of the RBAC matchers the back end generates, with
// Envoy's semantics.
func matchString(m *matcherv3.StringMatcher, v string) bool {
	if m.GetIgnoreCase() {
		v = strings.ToLower(v)
	}
	switch p := m.GetMatchPattern().(type) {
	case *matcherv3.StringMatcher_Exact:
		return v == cased(p.Exact, m)
	case *matcherv3.StringMatcher_Prefix:
		return strings.HasPrefix(v, cased(p.Prefix, m))
	case *matcherv3.StringMatcher_Suffix:
		return strings.HasSuffix(v, cased(p.Suffix, m))
	case *matcherv3.StringMatcher_SafeRegex:
		return regexp.MustCompile(`^(?:` + p.SafeRegex.GetRegex() + `)$`).MatchString(v)
	}
	panic("unexpected string matcher")
}

func cased(s string, m *matcherv3.StringMatcher) string {
	if m.GetIgnoreCase() {
		return strings.ToLower(s)
	}
	return s
}

func matchHeader(h *routev3.HeaderMatcher, c conn) bool {
	v, ok := c.headers[h.GetName()]
	if h.GetPresentMatch() {
		return ok
	}
	return ok && matchString(h.GetStringMatch(), v)
}

func cidrContains(prefix string, bits uint32, a netip.Addr) bool {
	p, err := netip.ParseAddr(prefix)
	if err != nil || !a.IsValid() {
		return false
	}
	return netip.PrefixFrom(p, int(bits)).Contains(a)
}

func matchPrincipal(p *rbacv3.Principal, c conn) bool {
	switch id := p.GetIdentifier().(type) {
	case *rbacv3.Principal_Any:
		return true
	case *rbacv3.Principal_AndIds:
		for _, x := range id.AndIds.GetIds() {
			if !matchPrincipal(x, c) {
				return false
			}
		}
		return true
	case *rbacv3.Principal_OrIds:
		for _, x := range id.OrIds.GetIds() {
			if matchPrincipal(x, c) {
				return true
			}
		}
		return false
	case *rbacv3.Principal_NotId:
		return !matchPrincipal(id.NotId, c)
	case *rbacv3.Principal_Authenticated_:
		return c.peer != "" && matchString(id.Authenticated.GetPrincipalName(), c.peer)
	case *rbacv3.Principal_DirectRemoteIp:
		return cidrContains(id.DirectRemoteIp.GetAddressPrefix(), id.DirectRemoteIp.GetPrefixLen().GetValue(), c.sourceIP)
	case *rbacv3.Principal_RemoteIp:
		return cidrContains(id.RemoteIp.GetAddressPrefix(), id.RemoteIp.GetPrefixLen().GetValue(), c.remoteIP)
	case *rbacv3.Principal_Header:
		return matchHeader(id.Header, c)
	}
	panic("unexpected principal")
}

func matchPermission(p *rbacv3.Permission, c conn) bool {
	switch r := p.GetRule().(type) {
	case *rbacv3.Permission_Any:
		return true
	case *rbacv3.Permission_AndRules:
		for _, x := range r.AndRules.GetRules() {
			if !matchPermission(x, c) {
				return false
			}
		}
		return true
	case *rbacv3.Permission_OrRules:
		for _, x := range r.OrRules.GetRules() {
			if matchPermission(x, c) {
				return true
			}
		}
		return false
	case *rbacv3.Permission_NotRule:
		return !matchPermission(r.NotRule, c)
	case *rbacv3.Permission_Header:
		return matchHeader(r.Header, c)
	case *rbacv3.Permission_UrlPath:
		return c.http && matchString(r.UrlPath.GetPath(), c.path)
	case *rbacv3.Permission_DestinationPort:
		return c.destPort == r.DestinationPort
	case *rbacv3.Permission_DestinationIp:
		return cidrContains(r.DestinationIp.GetAddressPrefix(), r.DestinationIp.GetPrefixLen().GetValue(), c.destIP)
	case *rbacv3.Permission_RequestedServerName:
		return c.sni != "" && matchString(r.RequestedServerName, c.sni)
	}
	panic("unexpected permission")
}

// matches reports whether any policy of the filter matches.
func matches(f *rbacv3.RBAC, c conn) bool {
	for _, p := range f.GetPolicies() {
		perm, princ := false, false
		for _, x := range p.GetPermissions() {
			perm = perm || matchPermission(x, c)
		}
		for _, x := range p.GetPrincipals() {
			princ = princ || matchPrincipal(x, c)
		}
		if perm && princ {
			return true
		}
	}
	return false
}

func allowed(f *rbac.Filters, c conn) bool {
	if f.Deny != nil && matches(f.Deny, c) {
		return false
	}
	return f.Allow == nil || matches(f.Allow, c)
}

// applicable selects the policies for the destination, as the engine does.
func applicable(ps []*policy.Policy, root string, req *authv3.CheckRequest) []*policy.Policy {
	d := req.GetAttributes().GetDestination()
	id, _ := engine.ParseIdentity(d.GetPrincipal())
	var out []*policy.Policy
	for _, p := range ps {
		if p.Namespace != root && p.Namespace != id.Namespace {
			continue
		}
		ok := true
		for k, v := range p.Selector {
			if d.GetLabels()[k] != v {
				ok = false
			}
		}
		if ok {
			out = append(out, p)
		}
	}
	return out
}

// TestAgreesWithCaseFiles holds the RBAC back end to the same case files as
// the engine: every case without CUSTOM policies, path rejection or
// evaluation errors must get the same allow or deny.
func TestAgreesWithCaseFiles(t *testing.T) {
	files, err := filepath.Glob("../testdata/cases/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no case files: %v", err)
	}
	compared := 0
	for _, f := range files {
		cf, err := casefile.Load(f)
		if err != nil {
			t.Fatal(err)
		}
		if cf.LoadError != "" || len(cf.Bundles) > 0 {
			continue
		}
		ps, err := policy.ParseYAML(f, []byte(cf.Policies), "default")
		if err != nil {
			t.Fatal(err)
		}
		root := cf.RootNamespace
		if root == "" {
			root = engine.DefaultRootNamespace
		}
		for _, c := range cf.Cases {
			if c.Want.Error || c.Want.Reason == engine.ReasonPathRejected {
				continue
			}
			req := c.Request.CheckRequest()
			path, _ := pathnorm.Normalize(req.GetAttributes().GetRequest().GetHttp().GetPath())
			fs, err := rbac.Build(applicable(ps, root, req), req.GetAttributes().GetRequest().GetHttp() == nil)
			if err != nil {
				t.Fatalf("%s: %s: %v", f, c.Name, err)
			}
			if got := allowed(fs, connOf(req, path, engine.NewGatewayIDs(cf.Gateways...))); got != c.Want.Allowed {
				t.Errorf("%s: %s: RBAC allowed = %v, want %v", filepath.Base(f), c.Name, got, c.Want.Allowed)
			}
			compared++
		}
	}
	if compared < 100 {
		t.Fatalf("only %d cases compared", compared)
	}
}

func TestCustomRefused(t *testing.T) {
	_, err := rbac.Build([]*policy.Policy{{Namespace: "a", Name: "b", Action: policy.Custom, Provider: "rego:x"}}, false)
	if !errors.Is(err, rbac.ErrCustom) {
		t.Fatalf("Build = %v, want ErrCustom", err)
	}
}

// TestGolden pins the generated RBAC for the bookinfo example; refresh
// with -update and review the diff like code.
func TestGolden(t *testing.T) {
	raw, err := os.ReadFile("../../examples/policies/10-bookinfo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ps, err := policy.ParseYAML("10-bookinfo.yaml", raw, "default")
	if err != nil {
		t.Fatal(err)
	}
	for _, tcp := range []bool{false, true} {
		name := "testdata/bookinfo.http.golden"
		if tcp {
			name = "testdata/bookinfo.tcp.golden"
		}
		fs, err := rbac.Build(ps, tcp)
		if err != nil {
			t.Fatal(err)
		}
		var b strings.Builder
		for _, f := range []struct {
			name string
			r    *rbacv3.RBAC
		}{{"deny", fs.Deny}, {"allow", fs.Allow}, {"shadow_allow", fs.ShadowAllow}} {
			if err := f.r.ValidateAll(); err != nil {
				t.Fatalf("%s filter is invalid: %v", f.name, err)
			}
			js, err := protojson.MarshalOptions{Multiline: true}.Marshal(f.r)
			if err != nil {
				t.Fatal(err)
			}
			b.WriteString("// " + f.name + "\n" + string(js) + "\n")
		}
		if *update {
			if err := os.MkdirAll("testdata", 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(name, []byte(b.String()), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		want, err := os.ReadFile(name)
		if err != nil {
			t.Fatalf("%v (run with -update to create it)", err)
		}
		if normalizeJSON(string(want)) != normalizeJSON(b.String()) {
			t.Errorf("%s differs from the generated RBAC; run with -update and review:\n%s", name, b.String())
		}
	}
}

// normalizeJSON drops the whitespace protojson randomizes.
func normalizeJSON(s string) string { return strings.Join(strings.Fields(s), " ") }

// TestNegationNeverInvertsAHeaderMatcher holds the RBAC back end to one way
// of negating: not_id and not_rule, which hold when the request lacks the
// attribute. A header matcher's invert_match is false for a missing header,
// so a DENY on notValues would let a request without the header through.
func TestNegationNeverInvertsAHeaderMatcher(t *testing.T) {
	files, err := filepath.Glob("../testdata/cases/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no case files: %v", err)
	}
	negated := 0
	for _, f := range files {
		cf, err := casefile.Load(f)
		if err != nil {
			t.Fatal(err)
		}
		if cf.LoadError != "" || len(cf.Bundles) > 0 {
			continue
		}
		ps, err := policy.ParseYAML(f, []byte(cf.Policies), "default")
		if err != nil {
			t.Fatal(err)
		}
		for _, tcp := range []bool{false, true} {
			fs, err := rbac.Build(ps, tcp)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range []*rbacv3.RBAC{fs.Deny, fs.Allow, fs.ShadowDeny, fs.ShadowAllow, fs.Audit} {
				walk(r.ProtoReflect(), func(m protoreflect.Message) {
					switch x := m.Interface().(type) {
					case *routev3.HeaderMatcher:
						if x.GetInvertMatch() {
							t.Errorf("%s: header matcher %q uses invert_match", filepath.Base(f), x.GetName())
						}
					case *rbacv3.Principal:
						if x.GetNotId() != nil {
							negated++
						}
					case *rbacv3.Permission:
						if x.GetNotRule() != nil {
							negated++
						}
					}
				})
			}
		}
	}
	if negated == 0 {
		t.Fatal("no negation generated: the case files lost their not* fields")
	}
}

// walk calls fn for m and every message under it.
func walk(m protoreflect.Message, fn func(protoreflect.Message)) {
	if !m.IsValid() {
		return
	}
	fn(m)
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsMap():
			if fd.MapValue().Kind() == protoreflect.MessageKind {
				v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
					walk(mv.Message(), fn)
					return true
				})
			}
		case fd.Kind() != protoreflect.MessageKind:
		case fd.IsList():
			for i := 0; i < v.List().Len(); i++ {
				walk(v.List().Get(i).Message(), fn)
			}
		default:
			walk(v.Message(), fn)
		}
		return true
	})
}
