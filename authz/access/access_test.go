package access_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/authz/access"
	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
)

func compute(t *testing.T, yaml string) *access.Matrix {
	t.Helper()
	ps, err := policy.ParseYAML("test", []byte(yaml), "default")
	if err != nil {
		t.Fatal(err)
	}
	m, err := access.Compute(ps, soundMesh(), access.Options{RootNamespace: root, TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func cell(t *testing.T, m *access.Matrix, from, to string, port uint32) access.Cell {
	t.Helper()
	for _, c := range m.To(to, port) {
		if c.From == from {
			return c
		}
	}
	t.Fatalf("no cell %s -> %s:%d", from, to, port)
	return access.Cell{}
}

func wantCell(t *testing.T, c access.Cell, v access.Verdict, policy string, reason string, conds ...string) {
	t.Helper()
	if c.Verdict != v || c.Policy != policy || !strings.HasPrefix(c.Reason, reason) {
		t.Errorf("%s -> %s:%d = %s (policy %q, reason %q); want %s (policy %q, reason %q...)", c.From, c.To, c.Port, c.Verdict, c.Policy, c.Reason, v, policy, reason)
	}
	for _, want := range conds {
		if !slices.ContainsFunc(c.Conditions, func(s string) bool { return strings.Contains(s, want) }) {
			t.Errorf("%s -> %s:%d: no condition says %q: %q", c.From, c.To, c.Port, want, c.Conditions)
		}
	}
	if v != access.Conditional && c.Verdict == v && len(conds) == 0 && len(c.Conditions) > 0 {
		t.Errorf("%s -> %s:%d is %s with conditions %q", c.From, c.To, c.Port, v, c.Conditions)
	}
}

const head = "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\n"

func TestServicesAndCallers(t *testing.T) {
	m := compute(t, "")
	var ids []string
	for _, s := range m.Services {
		ids = append(ids, s.ID+" "+s.Kind)
	}
	want := []string{"db/store service", "other/client workload", "web/api service", "web/cron workload", "web/front service"}
	if !slices.Equal(ids, want) {
		t.Errorf("services %q, want %q", ids, want)
	}
	api := m.Service("web/api")
	if !slices.Equal(api.Identities, []string{"spiffe://cluster.local/ns/web/sa/api", "spiffe://cluster.local/ns/web/sa/api-canary"}) || len(api.Ports) != 2 {
		t.Errorf("web/api = %+v", api)
	}
	// 3 services and 2 client identities call 4 service ports.
	if len(m.Cells) != 5*4 {
		t.Errorf("%d cells, want 20", len(m.Cells))
	}
	wantCell(t, cell(t, m, "other/client", "db/store", 5432), access.Allowed, "", access.ReasonNoAllowPolicy)
	if got := len(m.From("web/cron")); got != 4 {
		t.Errorf("From(web/cron): %d cells, want 4", got)
	}
	if got := len(m.To("web/api", 9091)); got != 5 {
		t.Errorf("To(web/api, 9091): %d cells, want 5", got)
	}
	// The JSON of contract 2: lists, never null.
	b, err := json.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(b), "null,") && !strings.Contains(string(b), `"rule":null`) || strings.Contains(string(b), `"conditions":null`) || strings.Contains(string(b), `"ports":null`) {
		t.Errorf("null list in %s", b)
	}
}

func TestVerdicts(t *testing.T) {
	t.Run("DENY from a namespace, mesh-wide", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: no-other, namespace: istio-system}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [other]}}]}]}`)
		wantCell(t, cell(t, m, "other/client", "web/front", 80), access.Denied, "istio-system/no-other", access.ReasonDenyMatches)
		wantCell(t, cell(t, m, "other/client", "db/store", 5432), access.Denied, "istio-system/no-other", access.ReasonDenyMatches)
		wantCell(t, cell(t, m, "web/cron", "web/front", 80), access.Allowed, "", access.ReasonNoAllowPolicy)
	})
	t.Run("dry-run and AUDIT never decide", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: deny-all, namespace: istio-system, annotations: {istio.io/dry-run: "true"}}
spec: {action: DENY, rules: [{}]}
---
`+head+`metadata: {name: audit, namespace: web}
spec: {action: AUDIT, rules: [{}]}`)
		for _, c := range m.Cells {
			wantCell(t, c, access.Allowed, "", access.ReasonNoAllowPolicy)
		}
	})
	t.Run("ALLOW by principal, and no ALLOW rule matches", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: api-callers, namespace: web}
spec:
  selector: {matchLabels: {app: api}}
  rules: [{from: [{source: {principals: [cluster.local/ns/web/sa/front]}}]}]`)
		wantCell(t, cell(t, m, "web/front", "web/api", 9090), access.Allowed, "web/api-callers", access.ReasonAllowMatches)
		c := cell(t, m, "web/cron", "web/api", 9091)
		wantCell(t, c, access.Denied, "", access.ReasonNoAllowMatches)
		if !strings.Contains(c.Reason, "web/api-callers") {
			t.Errorf("reason %q does not name the ALLOW policies", c.Reason)
		}
		// Policies of web do not select db's workloads.
		wantCell(t, cell(t, m, "web/cron", "db/store", 5432), access.Allowed, "", access.ReasonNoAllowPolicy)
	})
	t.Run("conditional on the request, in words", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: front, namespace: web}
spec:
  selector: {matchLabels: {app: front}}
  rules:
  - to: [{operation: {methods: [GET], paths: ["/api/*"]}}]
    when: [{key: "request.headers[x-user]", notValues: [mallory]}]
---
`+head+`metadata: {name: no-admin, namespace: web}
spec: {action: DENY, rules: [{to: [{operation: {paths: [/admin]}}]}]}`)
		c := cell(t, m, "web/cron", "web/front", 80)
		wantCell(t, c, access.Conditional, "web/no-admin", access.ReasonDepends,
			`allowed by ALLOW web/front rule 0 when request.method is "GET" and request.path starts with "/api/" and request.headers[x-user] is not "mallory" (or is absent)`,
			`denied by DENY web/no-admin rule 0 when request.path is "/admin"`,
			"denied otherwise: no ALLOW rule matches (ALLOW policies: web/front)")
		// A TCP port: an ALLOW rule with HTTP fields matches nothing,
		// the DENY's path is dropped and it denies everything.
		wantCell(t, cell(t, m, "web/cron", "db/store", 5432), access.Allowed, "", access.ReasonNoAllowPolicy)
		wantCell(t, cell(t, m, "web/cron", "web/api", 9091), access.Conditional, "web/no-admin", access.ReasonDepends,
			`denied by DENY web/no-admin rule 0 when request.path is "/admin"`, "allowed otherwise: no ALLOW policy applies")
	})
	t.Run("TCP drops HTTP fields", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: store, namespace: db}
spec: {rules: [{to: [{operation: {paths: ["/x"]}}]}]}
---
`+head+`metadata: {name: store-deny, namespace: db}
spec: {action: DENY, rules: [{from: [{source: {namespaces: [other]}}], to: [{operation: {methods: [DELETE]}}]}]}`)
		wantCell(t, cell(t, m, "web/cron", "db/store", 5432), access.Denied, "", access.ReasonNoAllowMatches)
		wantCell(t, cell(t, m, "other/client", "db/store", 5432), access.Denied, "db/store-deny", access.ReasonDenyMatches)
	})
	t.Run("target port and destination address are facts", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: ports, namespace: web}
spec:
  rules:
  - to: [{operation: {ports: ["8080"]}}]
  - when: [{key: destination.ip, values: [10.0.0.3]}]`)
		// front's port 80 targets 8080.
		wantCell(t, cell(t, m, "web/cron", "web/front", 80), access.Allowed, "web/ports", access.ReasonAllowMatches)
		// api-0 is 10.0.0.3, api-canary-0 is 10.0.0.4.
		wantCell(t, cell(t, m, "web/cron", "web/api", 9090), access.Conditional, "web/ports", access.ReasonMixed,
			"to web/api-0: allowed (ALLOW rule matches: web/ports rule 1)", "to web/api-canary-0: denied (no ALLOW rule matches")
	})
	t.Run("workloads alike but for their address", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: one, namespace: web}
spec: {selector: {matchLabels: {app: front}}, rules: [{when: [{key: destination.ip, values: [10.0.0.1]}]}]}`)
		wantCell(t, cell(t, m, "web/cron", "web/front", 80), access.Conditional, "web/one", access.ReasonMixed,
			"to web/front-0: allowed (ALLOW rule matches: web/one rule 0)", "to web/front-2: denied (no ALLOW rule matches")
	})
	t.Run("several identities of one caller", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: store, namespace: db}
spec: {rules: [{from: [{source: {principals: ["*/sa/api"]}}]}]}`)
		wantCell(t, cell(t, m, "web/api", "db/store", 5432), access.Conditional, "db/store", access.ReasonMixed,
			"from spiffe://cluster.local/ns/web/sa/api: allowed", "from spiffe://cluster.local/ns/web/sa/api-canary: denied")
	})
	t.Run("selector picks one workload", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: v2, namespace: web}
spec: {action: DENY, selector: {matchLabels: {version: v2}}, rules: [{}]}`)
		c := cell(t, m, "web/cron", "web/front", 80)
		wantCell(t, c, access.Conditional, "web/v2", access.ReasonMixed, "to web/front-0: allowed", "to web/front-1: denied (DENY rule matches: web/v2 rule 0)")
	})
	t.Run("CUSTOM is an external decision", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: ext, namespace: istio-system}
spec: {action: CUSTOM, provider: {name: "rego:envoy/authz/allow"}, rules: [{to: [{operation: {paths: ["/api/*"]}}]}]}`)
		wantCell(t, cell(t, m, "web/cron", "web/front", 80), access.Conditional, "istio-system/ext", access.ReasonCustom,
			`the external authorizer "rego:envoy/authz/allow" (CUSTOM istio-system/ext rule 0) decides when request.path starts with "/api/"`)
		// Its rule has HTTP fields only: on TCP it matches everything
		// (CUSTOM drops them, as DENY does).
		wantCell(t, cell(t, m, "web/cron", "db/store", 5432), access.Conditional, "istio-system/ext", access.ReasonCustom, "decides every request",
			"allowed otherwise: no ALLOW policy applies")
	})
	t.Run("a DENY that always matches wins over CUSTOM and ALLOW", func(t *testing.T) {
		m := compute(t, head+`metadata: {name: ext, namespace: istio-system}
spec: {action: CUSTOM, provider: {name: "rego:envoy/authz/allow"}, rules: [{}]}
---
`+head+`metadata: {name: allow, namespace: db}
spec: {rules: [{}]}
---
`+head+`metadata: {name: deny, namespace: db}
spec: {action: DENY, rules: [{from: [{source: {notNamespaces: [web]}}]}]}`)
		wantCell(t, cell(t, m, "other/client", "db/store", 5432), access.Denied, "db/deny", access.ReasonDenyMatches)
		wantCell(t, cell(t, m, "web/cron", "db/store", 5432), access.Conditional, "istio-system/ext", access.ReasonCustom, "decides every request",
			"allowed otherwise: ALLOW rule matches: db/allow rule 0")
	})
}

func TestComputeRefuses(t *testing.T) {
	if _, err := access.Compute(nil, nil, access.Options{}); !errors.Is(err, access.ErrInput) {
		t.Errorf("nil mesh: %v", err)
	}
	if _, err := access.Compute(nil, soundMesh(), access.Options{TrustDomain: "example.org"}); !errors.Is(err, access.ErrInput) {
		t.Errorf("foreign trust domain: %v", err)
	}
	m := soundMesh()
	m.Services = append(m.Services, &mesh.Service{Namespace: "web", Name: "empty", Hostname: "empty.web.svc.cluster.local", Ports: []mesh.Port{{Name: "http", Port: 80, Protocol: mesh.HTTP}}})
	mx, err := access.Compute(nil, m, access.Options{TrustDomain: "cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	wantCell(t, cell(t, mx, "web/cron", "web/empty", 80), access.Denied, "", access.ReasonNoWorkloads)
}

func TestLoadExamples(t *testing.T) {
	m, err := access.Load(context.Background(), access.LoadConfig{PolicyDir: "../../examples/mesh/policies", MeshDir: "../../examples/mesh"})
	if err != nil {
		t.Fatal(err)
	}
	wantCell(t, cell(t, m, "demo/client", "demo/echo", 7070), access.Conditional, "demo/echo-callers", access.ReasonDepends,
		`allowed by ALLOW demo/echo-callers rule 0 when request.path starts with "/grpc.health.v1.Health/"`)
	wantCell(t, cell(t, m, "demo/echo", "demo/echo", 7070), access.Denied, "", access.ReasonNoAllowMatches)
	if _, err := access.Load(context.Background(), access.LoadConfig{PolicyDir: "../../examples/mesh/policies", MeshDir: "../../examples/nosuch"}); !errors.Is(err, access.ErrInput) {
		t.Errorf("missing mesh dir: %v", err)
	}
	if _, err := access.Load(context.Background(), access.LoadConfig{PolicyDir: "../../examples/mesh/policies", MeshDir: "../../examples/mesh", TrustDomain: "example.org"}); !errors.Is(err, access.ErrInput) {
		t.Errorf("foreign trust domain: %v", err)
	}
}

// TestRedact: with a redactor, conditions show a header's value only when
// the decision log's allowlist names the header, and paths through its
// path patterns; without one, the policy's values as written.
func TestRedact(t *testing.T) {
	ps, err := policy.ParseYAML("test", []byte(head+`metadata: {name: front, namespace: web}
spec:
  selector: {matchLabels: {app: front}}
  rules:
  - to: [{operation: {paths: ["/reset/tok-8f3a9c*"]}}]
    when:
    - {key: "request.headers[x-api-key]", values: [sk_live_SUPERSECRET]}
    - {key: "request.headers[User-Agent]", values: [probe/1]}`), "default")
	if err != nil {
		t.Fatal(err)
	}
	red, err := decisionlog.NewRedactor(nil, nil, []string{`^/reset/(tok-[^/]*)`})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		red        *decisionlog.Redactor
		want, hide []string
	}{
		{"verbatim", nil, []string{`"sk_live_SUPERSECRET"`, `"/reset/tok-8f3a9c"`, `"probe/1"`}, nil},
		{"redacted", red,
			[]string{`request.headers[x-api-key] is "REDACTED"`, `request.path starts with "/reset/REDACTED"`, `request.headers[user-agent] is "probe/1"`},
			[]string{"SUPERSECRET", "tok-8f3a9c"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m, err := access.Compute(ps, soundMesh(), access.Options{RootNamespace: root, TrustDomain: "cluster.local", Redact: tc.red})
			if err != nil {
				t.Fatal(err)
			}
			c := cell(t, m, "web/cron", "web/front", 80)
			text := strings.Join(c.Conditions, "\n")
			for _, w := range tc.want {
				if !strings.Contains(text, w) {
					t.Errorf("conditions do not say %s:\n%s", w, text)
				}
			}
			for _, h := range tc.hide {
				if strings.Contains(text, h) {
					t.Errorf("conditions show %q:\n%s", h, text)
				}
			}
		})
	}
}
