package policy

import (
	"errors"
	"fmt"
	"os"
	"strings"
	"testing"
)

const head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: foo}\n"

// TestRefusals checks that every field trustmesh does not implement, and
// every invalid value, is refused with an error naming the field.
func TestRefusals(t *testing.T) {
	tests := []struct {
		name  string
		doc   string
		field string
		kind  error
	}{
		{"requestPrincipals", "spec: {rules: [{from: [{source: {requestPrincipals: [a/b]}}]}]}", "spec.rules[0].from[0].source.requestPrincipals", ErrUnsupported},
		{"notRequestPrincipals", "spec: {rules: [{from: [{source: {notRequestPrincipals: [a/b]}}]}]}", "spec.rules[0].from[0].source.notRequestPrincipals", ErrUnsupported},
		{"request.auth claims", "spec: {rules: [{when: [{key: 'request.auth.claims[iss]', values: [x]}]}]}", "spec.rules[0].when[0].key", ErrUnsupported},
		{"unknown when key", "spec: {rules: [{when: [{key: source.serviceAccount, values: [x]}]}]}", "spec.rules[0].when[0].key", ErrUnsupported},
		{"experimental when key", "spec: {rules: [{when: [{key: 'experimental.envoy.filters.a', values: [x]}]}]}", "spec.rules[0].when[0].key", ErrUnsupported},
		{"targetRef", "spec: {targetRef: {kind: Gateway, group: gateway.networking.k8s.io, name: g}}", "spec.targetRef", ErrUnsupported},
		{"targetRefs", "spec: {targetRefs: [{kind: Service, group: '', name: s}]}", "spec.targetRefs", ErrUnsupported},
		{"when without values", "spec: {rules: [{when: [{key: source.ip}]}]}", "spec.rules[0].when[0]", ErrInvalid},
		{"empty source", "spec: {rules: [{from: [{source: {}}]}]}", "spec.rules[0].from[0].source", ErrInvalid},
		{"empty operation", "spec: {rules: [{to: [{operation: {}}]}]}", "spec.rules[0].to[0].operation", ErrInvalid},
		{"bad port", "spec: {rules: [{to: [{operation: {ports: ['80*']}}]}]}", "spec.rules[0].to[0].operation.ports[0]", ErrInvalid},
		{"bad ip", "spec: {rules: [{from: [{source: {ipBlocks: [10.0.0.0/33]}}]}]}", "spec.rules[0].from[0].source.ipBlocks[0]", ErrInvalid},
		{"bad destination.port", "spec: {rules: [{when: [{key: destination.port, values: [http]}]}]}", "spec.rules[0].when[0].values[0]", ErrInvalid},
		{"wildcard inside", "spec: {rules: [{to: [{operation: {hosts: ['a*b']}}]}]}", "spec.rules[0].to[0].operation.hosts[0]", ErrInvalid},
		{"template not last", "spec: {rules: [{to: [{operation: {paths: ['/{**}/a/{*}']}}]}]}", "spec.rules[0].to[0].operation.paths[0]", ErrInvalid},
		{"template mixed segment", "spec: {rules: [{to: [{operation: {paths: ['/foo/{*}.txt']}}]}]}", "spec.rules[0].to[0].operation.paths[0]", ErrInvalid},
		{"template with glob", "spec: {rules: [{to: [{operation: {paths: ['/*/baz/{*}']}}]}]}", "spec.rules[0].to[0].operation.paths[0]", ErrInvalid},
		{"serviceAccounts wildcard", "spec: {rules: [{from: [{source: {serviceAccounts: ['ns/*']}}]}]}", "spec.rules[0].from[0].source.serviceAccounts[0]", ErrInvalid},
		{"serviceAccounts with principals", "spec: {rules: [{from: [{source: {serviceAccounts: [a], principals: [b]}}]}]}", "spec.rules[0].from[0].source.serviceAccounts", ErrInvalid},
		{"provider without CUSTOM", "spec: {action: DENY, provider: {name: x}}", "spec.provider", ErrInvalid},
		{"CUSTOM without provider", "spec: {action: CUSTOM}", "spec.provider.name", ErrInvalid},
		{"dry-run CUSTOM", "metadata: {name: p, namespace: foo, annotations: {istio.io/dry-run: 'true'}}\nspec: {action: CUSTOM, provider: {name: 'rego:a/b'}}", "metadata.annotations[istio.io/dry-run]", ErrUnsupported},
		{"dry-run value", "metadata: {name: p, namespace: foo, annotations: {istio.io/dry-run: 'yes'}}\nspec: {}", "metadata.annotations[istio.io/dry-run]", ErrInvalid},
		{"unknown spec field", "spec: {rules: [{to: [{operation: {pathz: [/a]}}]}]}", "spec.rules[0].to[0].operation.pathz", ErrInvalid},
		{"unknown metadata field", "metadata: {name: p, namespace: foo, uid: x}\nspec: {}", "metadata.uid", ErrInvalid},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			doc := head + tt.doc
			if strings.HasPrefix(tt.doc, "metadata:") {
				doc = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n" + tt.doc
			}
			_, err := ParseYAML("test.yaml", []byte(doc), "default")
			if err == nil {
				t.Fatal("accepted, want a refusal")
			}
			var fe *FieldError
			if !errors.As(err, &fe) {
				t.Fatalf("error %v is not a *FieldError", err)
			}
			if fe.Field != tt.field || !errors.Is(fe, tt.kind) || fe.Origin != "test.yaml (document 1)" || fe.Policy != "foo/p" {
				t.Fatalf("got %+v (%v), want field %s, kind %v", fe, err, tt.field, tt.kind)
			}
		})
	}
}

func TestParse(t *testing.T) {
	doc := `apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata: {name: p}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {serviceAccounts: [sa], notIpBlocks: [10.0.0.1]}}]
    to: [{operation: {paths: ["/a/{*}"], hosts: ["Example.COM"]}}]
    when: [{key: "request.headers[X-A]", values: ["v*"], notValues: ["vx"]}]
---
# a comment-only document is skipped
`
	ps, err := ParseYAML("t.yaml", []byte(doc), "defns")
	if err != nil {
		t.Fatal(err)
	}
	if len(ps) != 1 {
		t.Fatalf("got %d policies", len(ps))
	}
	p := ps[0]
	if p.Key() != "defns/p" || p.Action != Deny || p.Selector["app"] != "web" || len(p.Rules) != 1 {
		t.Fatalf("policy %+v", p)
	}
	r := p.Rules[0]
	if got := r.From[0][0]; got.Attr != SourceServiceAccount || got.Values[0].S != "defns/sa" {
		t.Errorf("serviceAccounts = %+v", got)
	}
	if got := r.From[0][1]; got.Attr != SourceIP || !got.Not || got.Values[0].Prefix.String() != "10.0.0.1/32" {
		t.Errorf("notIpBlocks = %+v", got)
	}
	if got := r.To[0][1]; got.Attr != Path || got.Values[0].Kind != Template || got.Values[0].Regexp != "^/a/[^/]+$" {
		t.Errorf("paths = %+v", got)
	}
	if got := r.To[0][0]; got.Values[0].S != "example.com" {
		t.Errorf("hosts = %+v", got)
	}
	if len(r.When) != 2 || r.When[0].HeaderName != "x-a" || r.When[0].Values[0].Kind != Prefix || !r.When[1].Not {
		t.Errorf("when = %+v", r.When)
	}
	if _, ok := r.ForTCP(Allow); ok {
		t.Error("ForTCP(Allow) kept a rule with HTTP-only fields")
	}
	tcp, ok := r.ForTCP(Deny)
	if !ok || len(tcp.When) != 0 || len(tcp.To) != 1 || len(tcp.To[0]) != 0 || len(tcp.From[0]) != 2 {
		t.Errorf("ForTCP(Deny) = %+v, %v", tcp, ok)
	}
}

// TestUnknownFieldLine checks that an unknown field names its line in the
// file, not a position in internal JSON, and the field the author meant.
func TestUnknownFieldLine(t *testing.T) {
	raw, err := os.ReadFile("testdata/unknown-field/policies.yaml")
	if err != nil {
		t.Fatal(err)
	}
	_, err = ParseYAML("testdata/unknown-field/policies.yaml", raw, "default")
	var fe *FieldError
	if !errors.As(err, &fe) {
		t.Fatalf("error %v is not a *FieldError", err)
	}
	want := `policy: testdata/unknown-field/policies.yaml (document 3), line 25: default/misspelt: spec.rules[0].to[0].operation.method: invalid: unknown field "method"; did you mean "methods"?`
	if err.Error() != want || !errors.Is(err, ErrInvalid) {
		t.Fatalf("error\n %v\nwant\n %s", err, want)
	}
}

func TestFieldErrorLines(t *testing.T) {
	tests := []struct {
		name, doc string
		lines     []int // of the errors, in order
		says      []string
	}{
		{"envelope", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetdata: {name: p}\nspec: {}\n",
			[]int{3}, []string{`unknown field "metdata"; did you mean "metadata"?`}},
		{"two unknown fields", head + "spec:\n  selector:\n    matchLabel: {app: a}\n  rules:\n  - form: [{source: {principals: [a]}}]\n",
			[]int{6, 8}, []string{`"matchLabel"; did you mean "matchLabels"?`, `"form"; did you mean "from"?`}},
		{"nothing near", head + "spec:\n  colour: blue\n", []int{5}, []string{`unknown field "colour"` + "\n"}},
		{"an invalid value", head + "spec:\n  rules:\n  - to:\n    - operation:\n        ports: ['80*']\n",
			[]int{8}, []string{"spec.rules[0].to[0].operation.ports[0]"}},
		{"an unknown enum", head + "spec:\n  action: ALOW\n", []int{4}, []string{`invalid value for enum`}},
		{"after a separator and a comment", "# c\n---\n" + head + "spec: {}\n---\n# c\n" + head + "spec:\n  action: DENY\n  rulez: []\n",
			[]int{14}, []string{`(document 3), line 14`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := ParseYAML("t.yaml", []byte(tt.doc), "default")
			if err == nil {
				t.Fatal("accepted")
			}
			var got []int
			var collect func(error)
			collect = func(e error) {
				if j, ok := e.(interface{ Unwrap() []error }); ok {
					for _, e := range j.Unwrap() {
						collect(e)
					}
					return
				}
				var fe *FieldError
				if !errors.As(e, &fe) {
					t.Fatalf("error %v is not a *FieldError", e)
				}
				got = append(got, fe.Line)
			}
			collect(err)
			if fmt.Sprint(got) != fmt.Sprint(tt.lines) {
				t.Errorf("lines %v, want %v: %v", got, tt.lines, err)
			}
			for _, s := range tt.says {
				if !strings.Contains(err.Error()+"\n", s) {
					t.Errorf("error %q does not say %q", err, s)
				}
			}
			if strings.Contains(err.Error(), "(line 1:") {
				t.Errorf("error %q names a position in internal JSON", err)
			}
		})
	}
}

// Keys of maps are data, and protojson's spelling of fields is accepted.
func TestKnownSpellingsAndMapKeys(t *testing.T) {
	doc := head + "metadata: {name: p, namespace: foo, annotations: {method: x}, labels: {methodz: v}}\n" +
		"spec:\n  selector: {match_labels: {method: a}}\n  rules: [{to: [{operation: {not_methods: [GET]}}]}]\n"
	doc = strings.Replace(doc, "metadata: {name: p, namespace: foo}\n", "", 1)
	if _, err := ParseYAML("t.yaml", []byte(doc), "default"); err != nil {
		t.Fatal(err)
	}
}

func TestNearest(t *testing.T) {
	names := []string{"from", "methods", "notMethods", "paths", "to", "when"}
	for key, want := range map[string]string{
		"method": "methods", "Methods": "methods", "form": "from", "notMethod": "notMethods",
		"pathz": "paths", "foo": "", "colour": "", "x": "",
	} {
		if got := nearest(key, names); got != want {
			t.Errorf("nearest(%q) = %q, want %q", key, got, want)
		}
	}
}

// TestMaxValues bounds the size of one policy: a policy of MaxValues
// entries parses, one more is refused as field spec.rules, once, with what
// to do, however the entries are spread, empty from, to and when entries
// included; so are a too long value, too many bytes of values and a path
// template of too many operators, each named by its field.
func TestMaxValues(t *testing.T) {
	const head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: big, namespace: foo}\n"
	values := func(n int) string { // one rule, one from, n-2 values
		var b strings.Builder
		b.WriteString("spec:\n  rules:\n  - from:\n    - source:\n        principals:\n")
		for i := range n - 2 {
			fmt.Fprintf(&b, "        - cluster.local/ns/n%d/sa/s\n", i)
		}
		return b.String()
	}
	rules := func(n int) string { // n/3 rules of one when of one value
		var b strings.Builder
		b.WriteString("spec:\n  rules:\n")
		for i := range n / 3 {
			fmt.Fprintf(&b, "  - when: [{key: 'request.headers[x%d]', values: [v]}]\n", i)
		}
		return b.String()
	}
	empty := func(n int) string { // one rule of n-1 empty sources
		return "spec:\n  rules:\n  - from:\n" + strings.Repeat("    - source: {}\n", n-1)
	}
	for name, doc := range map[string]func(int) string{"values": values, "rules": rules, "empty from": empty} {
		// Empty sources are refused one by one, but not for the bound.
		if _, err := ParseYAML("big.yaml", []byte(head+doc(MaxValues)), "default"); err != nil && (name != "empty from" || strings.Contains(err.Error(), "split it")) {
			t.Fatalf("%s: %d entries refused: %.300v", name, MaxValues, err)
		}
		_, err := ParseYAML("big.yaml", []byte(head+doc(MaxValues+3)), "default")
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != "spec.rules" || !errors.Is(err, ErrInvalid) ||
			!strings.Contains(err.Error(), fmt.Sprintf("holds more than %d rules, from, to and when entries, values and path template operators, the most one policy may hold: split it into several policies", MaxValues)) {
			t.Errorf("%s: %.300v, want one refusal of spec.rules saying to split the policy", name, err)
		}
		if n := strings.Count(fmt.Sprint(err), "\n"); n != 0 {
			t.Errorf("%s: %d refusals, want one:\n%v", name, n+1, err)
		}
	}

	paths := func(ps ...string) string {
		return head + "spec:\n  rules:\n  - to:\n    - operation:\n        paths: ['" + strings.Join(ps, "', '") + "']\n"
	}
	long := "/" + strings.Repeat("a", MaxValueBytes-1)
	tmpl := strings.Repeat("/{*}", MaxTemplateOperators-1) + "/{**}"
	many := make([]string, MaxPolicyBytes/MaxValueBytes)
	for i := range many {
		many[i] = long
	}
	for name, tc := range map[string]struct{ ok, refused, field, why string }{
		"value bytes": {paths("/x", long), paths("/x", long+"a"),
			"spec.rules[0].to[0].operation.paths[1]", fmt.Sprintf("a value of %d bytes, more than the %d one value may hold: simplify it", MaxValueBytes+1, MaxValueBytes)},
		"template operators": {paths(tmpl), paths("/x", "/{*}"+tmpl),
			"spec.rules[0].to[0].operation.paths[1]", fmt.Sprintf("a path template of more than %d {*} and {**} operators: simplify it, or split the path into several", MaxTemplateOperators)},
		"policy bytes": {paths(many...), paths(append(many, "/x")...),
			"spec.rules", fmt.Sprintf("its values hold more than %d bytes, the most one policy may hold: split it into several policies", MaxPolicyBytes)},
	} {
		if _, err := ParseYAML("big.yaml", []byte(tc.ok), "default"); err != nil {
			t.Errorf("%s: at the bound, refused: %v", name, err)
		}
		_, err := ParseYAML("big.yaml", []byte(tc.refused), "default")
		var fe *FieldError
		if !errors.As(err, &fe) || fe.Field != tc.field || !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.why) ||
			strings.Count(err.Error(), "\n") != 0 {
			t.Errorf("%s: %v, want one refusal of %s: %s", name, err, tc.field, tc.why)
		}
	}
}
