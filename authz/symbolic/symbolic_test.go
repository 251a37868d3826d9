package symbolic_test

import (
	"fmt"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/symbolic"
)

// rule parses one rule (YAML of spec.rules[0]) of a policy with action.
func rule(t *testing.T, action, yaml string) (policy.Action, policy.Rule) {
	t.Helper()
	var b strings.Builder
	fmt.Fprintf(&b, "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo}\nspec:\n  action: %s\n  rules:\n  - ", action)
	b.WriteString(strings.ReplaceAll(strings.TrimSpace(yaml), "\n", "\n    "))
	ps, err := policy.ParseYAML("test", []byte(b.String()), "foo")
	if err != nil {
		t.Fatalf("%s: %v", b.String(), err)
	}
	return ps[0].Action, ps[0].Rules[0]
}

func TestNeverMatches(t *testing.T) {
	for _, tc := range []struct {
		name, action, rule string
		want               bool
	}{
		{"principal and its negation", "DENY", `from: [{source: {principals: [a/b], notPrincipals: [a/b]}}]`, true},
		{"principal and not any", "DENY", `from: [{source: {principals: [a/b], notPrincipals: ["*"]}}]`, true},
		{"principal and not a prefix of it", "DENY", `from: [{source: {principals: [cluster.local/ns/x/sa/y], notPrincipals: ["cluster.local/*"]}}]`, true},
		{"prefix and not a longer prefix", "DENY", `from: [{source: {principals: ["cluster.local/*"], notPrincipals: ["cluster.local/ns/*"]}}]`, false},
		{"prefix and not a shorter prefix", "DENY", `from: [{source: {principals: ["cluster.local/ns/*"], notPrincipals: ["cluster.*"]}}]`, true},
		{"prefix and suffix negated apart", "DENY", `from: [{source: {principals: ["a*"], notPrincipals: ["*b"]}}]`, false},
		{"two exact values that differ", "DENY", `from: [{source: {principals: [a]}}]
when: [{key: source.principal, values: [b]}]`, true},
		{"two prefixes that disagree", "DENY", `from: [{source: {principals: ["a*"]}}]
when: [{key: source.principal, values: ["b*"]}]`, true},
		{"prefix and suffix meet", "DENY", `from: [{source: {principals: ["a*"]}}]
when: [{key: source.principal, values: ["*b"]}]`, false},
		{"one of two values excluded", "DENY", `from: [{source: {principals: [a, b], notPrincipals: [a]}}]`, false},
		{"ports", "DENY", `to: [{operation: {ports: ["80"], notPorts: ["80"]}}]`, true},
		{"ports across to and when", "DENY", `to: [{operation: {ports: ["80"]}}]
when: [{key: destination.port, values: ["443"]}]`, true},
		{"ports that overlap", "DENY", `to: [{operation: {ports: ["80", "443"], notPorts: ["80"]}}]`, false},
		{"ip block and itself negated", "DENY", `from: [{source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.0.0.0/8]}}]`, true},
		{"ip block and 0.0.0.0/0 negated", "DENY", `from: [{source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [0.0.0.0/0]}}]`, true},
		{"ip block and its halves negated", "DENY", `from: [{source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.0.0.0/9, 10.128.0.0/9]}}]`, true},
		{"ip block and one half negated", "DENY", `from: [{source: {ipBlocks: [10.0.0.0/8], notIpBlocks: [10.0.0.0/9]}}]`, false},
		{"IPv6 block and 0.0.0.0/0 negated", "DENY", `from: [{source: {ipBlocks: ["2001:db8::/32"], notIpBlocks: [0.0.0.0/0]}}]`, false},
		{"disjoint blocks", "DENY", `from: [{source: {ipBlocks: [10.0.0.0/8]}}]
when: [{key: source.ip, values: [192.168.0.0/16]}]`, true},
		{"not any ip alone", "DENY", `from: [{source: {notIpBlocks: [0.0.0.0/0, "::/0"]}}]`, false},
		// A DENY rule's HTTP-only fields are dropped for TCP: it matches
		// every TCP request.
		{"dead paths in a DENY still match TCP", "DENY", `to: [{operation: {paths: [/a], notPaths: [/a]}}]`, false},
		{"dead paths in an ALLOW", "ALLOW", `to: [{operation: {paths: [/a], notPaths: [/a]}}]`, true},
		{"hosts and notHosts in an ALLOW", "ALLOW", `to: [{operation: {hosts: [a.com], notHosts: [a.com]}}]`, true},
		// Outside ALLOW, hosts matches the host as sent or normalized and
		// notHosts either form not listed: "a.com:80" is both.
		{"hosts and notHosts outside ALLOW", "AUDIT", `to: [{operation: {hosts: [a.com], notHosts: [a.com]}}]`, false},
		{"path templates are opaque", "ALLOW", `to: [{operation: {paths: ["/a/{*}"], notPaths: ["/a/{*}"]}}]`, false},
		{"namespaces regexp outside ALLOW", "DENY", `from: [{source: {namespaces: [a], notNamespaces: [a]}}]`, true},
		{"namespaces regexp: an ID may hold two", "DENY", `from: [{source: {namespaces: [a]}}]
when: [{key: source.namespace, values: [b]}]`, false},
		{"namespaces in ALLOW hold one value", "ALLOW", `from: [{source: {namespaces: [a]}}]
when: [{key: source.namespace, values: [b]}]`, true},
		{"header and its negation", "ALLOW", `when: [{key: "request.headers[x-a]", values: ["v*"], notValues: ["v*"]}]`, true},
		{"header present and absent", "ALLOW", `when: [{key: "request.headers[x-a]", values: ["v"], notValues: ["*"]}]`, true},
		{"sni present and not present", "ALLOW", `when: [{key: connection.sni, values: ["*"], notValues: ["*"]}]`, true},
		{"one match of two is dead", "DENY", `from: [{source: {principals: [a], notPrincipals: [a]}}, {source: {principals: [b]}}]`, false},
		{"every match dead", "DENY", `from: [{source: {principals: [a], notPrincipals: [a]}}, {source: {ipBlocks: [1.2.3.4], notIpBlocks: [1.2.3.0/24]}}]`, true},
		{"empty rule", "DENY", `{}`, false},
		// An exact principal fixes the peer's other attributes.
		{"exact principal, its namespace negated", "DENY", `from: [{source: {principals: [cluster.local/ns/a/sa/b], notNamespaces: [a]}}]`, true},
		{"exact principal, another namespace", "ALLOW", `from: [{source: {principals: [cluster.local/ns/a/sa/b], namespaces: [c]}}]`, true},
		{"exact principal, its namespace", "DENY", `from: [{source: {principals: [cluster.local/ns/a/sa/b], namespaces: [a]}}]`, false},
		{"exact principal, not an ns/sa ID", "ALLOW", `from: [{source: {principals: [cluster.local/ns/a/sa/b/c]}}]
when: [{key: source.namespace, values: ["*"]}]`, true},
		{"exact principal, Istio's regexp on a longer ID", "DENY", `from: [{source: {principals: [cluster.local/ns/a/sa/b/c]}}]
when: [{key: source.namespace, values: [a]}]`, false},
		{"exact principal, its trust domain negated", "DENY", `from: [{source: {principals: [cluster.local/ns/a/sa/b, x.td/y], notTrustDomains: ["cluster.local", "*.td"]}}]`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a, r := rule(t, tc.action, tc.rule)
			if got := symbolic.NeverMatches(a, r); got != tc.want {
				t.Errorf("NeverMatches = %t, want %t", got, tc.want)
			}
		})
	}
}

func TestCovers(t *testing.T) {
	for _, tc := range []struct {
		name, deny, allow string
		want              bool
	}{
		{"empty deny covers all", `{}`, `from: [{source: {principals: [a]}}]`, true},
		{"same principals", `from: [{source: {principals: [a, b]}}]`, `from: [{source: {principals: [a]}}]`, true},
		{"fewer principals", `from: [{source: {principals: [a]}}]`, `from: [{source: {principals: [a, b]}}]`, false},
		{"prefix covers exact", `from: [{source: {principals: ["cluster.local/*"]}}]`, `from: [{source: {principals: [cluster.local/ns/a/sa/b]}}]`, true},
		{"deny paths, allow more", `to: [{operation: {paths: ["/admin*"]}}]`, `to: [{operation: {paths: ["/admin/x", "/admin"]}}]`, true},
		{"deny paths, allow other", `to: [{operation: {paths: ["/admin*"]}}]`, `to: [{operation: {paths: ["/public"]}}]`, false},
		{"deny paths, allow any path", `to: [{operation: {paths: ["/admin*"]}}]`, `to: [{operation: {methods: [GET]}}]`, false},
		{"deny narrowed by a when the allow also has", `to: [{operation: {ports: ["80"]}}]
when: [{key: source.ip, values: [10.0.0.0/8]}]`, `to: [{operation: {ports: ["80"]}}]
when: [{key: source.ip, values: [10.1.0.0/16]}]`, true},
		{"deny narrowed by a when the allow lacks", `to: [{operation: {ports: ["80"]}}]
when: [{key: source.ip, values: [10.0.0.0/8]}]`, `to: [{operation: {ports: ["80"]}}]`, false},
		{"deny notPrincipals, allow requires a peer elsewhere", `from: [{source: {notPrincipals: ["cluster.local/*"]}}]`, `from: [{source: {principals: ["other.td/*"]}}]`, true},
		{"deny hosts read both forms", `to: [{operation: {hosts: [a.com]}}]`, `to: [{operation: {hosts: [a.com]}}]`, true},
		{"deny from two sources, allow from one", `from: [{source: {principals: [a]}}, {source: {principals: [b]}}]`, `from: [{source: {principals: [b]}}]`, true},
		{"deny from two sources, allow from either", `from: [{source: {principals: [a]}}, {source: {principals: [b]}}]`, `from: [{source: {principals: [a, b]}}]`, true},
		{"deny two prefixes, allow under each", `to: [{operation: {paths: ["/a/*"]}}, {operation: {paths: ["/b/*"]}}]`, `to: [{operation: {paths: [/a/x, /b/y], methods: [GET, POST]}}]`, true},
		{"deny two prefixes, allow under one and elsewhere", `to: [{operation: {paths: ["/a/*"]}}, {operation: {paths: ["/b/*"]}}]`, `to: [{operation: {paths: [/a/x, /c]}}]`, false},
		{"allow from two sources, deny covers one", `from: [{source: {principals: [a]}}]`, `from: [{source: {principals: [a]}}, {source: {principals: [b]}}]`, false},
		// Outside ALLOW, namespaces are Istio's regexp on the SPIFFE ID,
		// which a newline in the ID would defeat; the engine denies such
		// IDs unevaluated, so the parsed namespace decides the regexp.
		{"namespaces read differently", `from: [{source: {namespaces: [a]}}]`, `from: [{source: {namespaces: [a]}}]`, true},
		{"deny a namespace prefix, allow namespaces in it", `from: [{source: {namespaces: ["a*"]}}]`, `from: [{source: {namespaces: [a, ab]}}]`, true},
		{"deny any namespace, allow one", `from: [{source: {namespaces: ["*"]}}]`, `from: [{source: {namespaces: [a]}}]`, true},
		{"deny a namespace, allow it and another", `from: [{source: {namespaces: [a]}}]`, `from: [{source: {namespaces: [a, b]}}]`, false},
		{"deny a namespace, allow a prefix of it", `from: [{source: {namespaces: [a]}}]`, `from: [{source: {namespaces: ["a*"]}}]`, false},
		{"deny a service account, allow it", `from: [{source: {serviceAccounts: [a/x]}}]`, `from: [{source: {serviceAccounts: [a/x]}}]`, true},
		{"deny a service account, allow another", `from: [{source: {serviceAccounts: [a/x]}}]`, `from: [{source: {serviceAccounts: [a/y]}}]`, false},
		{"deny ports, allow HTTP on that port", `to: [{operation: {ports: ["80"]}}]`, `to: [{operation: {ports: ["80"], paths: ["/x"]}}]`, true},
		{"deny HTTP fields, allow TCP", `to: [{operation: {paths: ["/x"]}}]`, `to: [{operation: {ports: ["80"]}}]`, false},
		{"deny namespace, allow a principal in it", `from: [{source: {namespaces: [attacker]}}]`, `from: [{source: {principals: [cluster.local/ns/attacker/sa/x, other.td/ns/attacker/sa/y/z]}}]`, true},
		{"deny namespace, allow a principal elsewhere", `from: [{source: {namespaces: [attacker]}}]`, `from: [{source: {principals: [cluster.local/ns/attacker/sa/x, cluster.local/ns/web/sa/x]}}]`, false},
		{"deny service account, allow its principal", `from: [{source: {serviceAccounts: [attacker/x]}}]`, `from: [{source: {principals: [cluster.local/ns/attacker/sa/x]}}]`, true},
		{"dead allow", `from: [{source: {principals: [zzz]}}]`, `from: [{source: {principals: [a], notPrincipals: [a]}}]`, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			da, d := rule(t, "DENY", tc.deny)
			aa, a := rule(t, "ALLOW", tc.allow)
			if got := symbolic.Covers(da, d, aa, a); got != tc.want {
				t.Errorf("Covers = %t, want %t", got, tc.want)
			}
		})
	}
}

func TestOverridesScope(t *testing.T) {
	ps, err := policy.ParseYAML("test", []byte(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-root, namespace: istio-system}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-foo-web, namespace: foo}
spec: {action: DENY, selector: {matchLabels: {app: web}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-dry, namespace: foo, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-foo-web-v1, namespace: foo}
spec: {selector: {matchLabels: {app: web, version: v1}}, rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-foo, namespace: foo}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-root, namespace: istio-system}
spec: {rules: [{}]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-bar, namespace: bar}
spec: {rules: [{}]}
`), "default")
	if err != nil {
		t.Fatal(err)
	}
	by := map[string]*policy.Policy{}
	for _, p := range ps {
		by[p.Name] = p
	}
	for _, tc := range []struct {
		deny, allow string
		want        bool
	}{
		{"deny-root", "allow-foo", true},
		{"deny-root", "allow-root", true},
		{"deny-foo-web", "allow-foo-web-v1", true},
		{"deny-foo-web", "allow-foo", false},
		{"deny-foo-web", "allow-root", false},
		{"deny-foo-web", "allow-bar", false},
		{"deny-dry", "allow-foo", false},
	} {
		if got := symbolic.Overrides(by[tc.deny], 0, by[tc.allow], 0, "istio-system"); got != tc.want {
			t.Errorf("Overrides(%s, %s) = %t, want %t", tc.deny, tc.allow, got, tc.want)
		}
	}
}

func TestConflictNamesTheFields(t *testing.T) {
	a, r := rule(t, "DENY", `from: [{source: {principals: [a], ipBlocks: [10.0.0.0/8]}}]
when: [{key: source.ip, notValues: [0.0.0.0/0]}]`)
	c := symbolic.Compile(a, r, symbolic.HTTP)
	if len(c.Conjs) != 1 {
		t.Fatalf("%d conjunctions, want 1", len(c.Conjs))
	}
	var got []string
	for _, l := range c.Conjs[0].Conflict() {
		got = append(got, l.Field)
	}
	want := []string{"spec.rules[0].from[0].source.ipBlocks", "spec.rules[0].when[0].notValues"}
	if strings.Join(got, ",") != strings.Join(want, ",") {
		t.Errorf("Conflict fields = %q, want %q", got, want)
	}
}

func TestDecidingTogether(t *testing.T) {
	ps, err := policy.ParseYAML("test", []byte(`
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-a, namespace: istio-system}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/a/*"]}}]
  - to: [{operation: {methods: [DELETE]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-b, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/b/*"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow, namespace: foo}
spec:
  rules:
  - to: [{operation: {paths: [/a/x, /b/y]}}]
  - to: [{operation: {paths: [/a/x]}}]
  - to: [{operation: {paths: [/a/x, /c]}}]
`), "default")
	if err != nil {
		t.Fatal(err)
	}
	allow := ps[2]
	name := func(rs []symbolic.RuleRef) string {
		var out []string
		for _, r := range rs {
			out = append(out, fmt.Sprintf("%s[%d]", r.Policy.Name, r.Rule))
		}
		return strings.Join(out, " ")
	}
	for ai, want := range []string{"deny-a[0] deny-b[0]", "deny-a[0]", ""} {
		if got := name(symbolic.Deciding(ps, allow, ai, "istio-system")); got != want {
			t.Errorf("Deciding(allow rule %d) = %q, want %q", ai, got, want)
		}
	}
}
