package engine_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/authz/casefile"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/engine/explaintest"
)

// TestExplainCases explains every case of authz/testdata/cases and holds
// each explanation to Check's decision and to every rule the engine
// matched.
func TestExplainCases(t *testing.T) {
	files, err := filepath.Glob("../testdata/cases/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no case files: %v", err)
	}
	ctx := context.Background()
	explained := 0
	for _, f := range files {
		cf, err := casefile.Load(f)
		if err != nil {
			t.Fatal(err)
		}
		if cf.LoadError != "" {
			continue
		}
		set, err := loadCaseFile(t, cf)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		x, err := set.Explainer(ctx)
		if err != nil {
			t.Fatalf("%s: %v", f, err)
		}
		for _, c := range cf.Cases {
			name := strings.TrimSuffix(filepath.Base(f), ".yaml") + "/" + c.Name
			d, _ := set.Check(ctx, c.Request.CheckRequest())
			ex, err := x.Explain(ctx, c.Request.CheckRequest())
			if err != nil {
				t.Errorf("%s: %v", name, err)
				continue
			}
			matching, err := set.MatchingRules(ctx, c.Request.CheckRequest())
			if err != nil && ex.Evaluated {
				t.Errorf("%s: MatchingRules: %v", name, err)
				continue
			}
			for _, msg := range explaintest.Disagreements(ex, d, matching) {
				t.Errorf("%s: %s", name, msg)
			}
			if ex.Evaluated {
				explained++
			}
		}
	}
	if explained < 50 {
		t.Fatalf("only %d cases were explained rule by rule", explained)
	}
}

// TestExplainMisses pins what an explanation says of the rules that miss:
// the first failing field, the attribute, the request's value and the
// values the field wanted; and, for TCP, what was dropped or skipped.
func TestExplainMisses(t *testing.T) {
	cf := &casefile.File{Policies: `
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: foo}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source: {principals: ["cluster.local/ns/bar/sa/client"]}
    to:
    - operation: {methods: ["GET"], paths: ["/api/*", "/health"]}
  - from:
    - source: {namespaces: ["ops"]}
    - source: {ipBlocks: ["192.168.0.0/16"]}
  - when:
    - key: request.headers[x-token]
      values: ["open-sesame"]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-debug, namespace: foo}
spec:
  action: DENY
  rules:
  - to:
    - operation: {paths: ["/debug*"], notPorts: ["9090"]}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: other, namespace: foo}
spec:
  selector: {matchLabels: {app: db}}
  rules:
  - {}
`}
	set, err := loadCaseFile(t, cf)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Run("http", func(t *testing.T) {
		req := casefile.Request{HTTP: casefile.HTTP{Method: "POST", Path: "/api/x", Headers: map[string]string{"x-token": "guess"}}}
		ex, err := set.Explain(ctx, req.CheckRequest())
		if err != nil {
			t.Fatal(err)
		}
		if ex.Decision.Allowed || ex.Decision.Reason != engine.ReasonNoAllowMatched {
			t.Fatalf("decision %+v", ex.Decision)
		}
		if len(ex.Selection.NotSelected) != 1 || ex.Selection.NotSelected[0].Policy != "foo/other" || ex.Selection.NotSelected[0].Why != "selector app=db: the workload has app=web" {
			t.Errorf("not selected: %+v", ex.Selection.NotSelected)
		}
		if len(ex.Policies) != 2 || ex.Policies[0].Policy != "foo/deny-debug" || ex.Policies[1].Policy != "foo/allow-web" {
			t.Fatalf("policies %+v, want DENY then ALLOW", ex.Policies)
		}
		deny := ex.Policies[0].Rules[0]
		if deny.Matched || len(deny.Misses) != 1 || deny.Misses[0].Field != "spec.rules[0].to[0].operation.paths" || *deny.Misses[0].Value != "/api/x" {
			t.Errorf("deny rule: %+v", deny)
		}
		allow := ex.Policies[1].Rules
		want := []struct {
			field, attr string
			value       *string
			wanted      []string
		}{
			{"spec.rules[0].to[0].operation.methods", "request.method", ptr("POST"), []string{"GET"}},
			{"spec.rules[1].from[0].source.namespaces", "source.namespace", ptr("bar"), []string{"ops"}},
			{"spec.rules[1].from[1].source.ipBlocks", "source.ip", ptr("10.0.0.1"), []string{"192.168.0.0/16"}},
			{"spec.rules[2].when[0].values", "request.headers[x-token]", ptr("guess"), []string{"open-sesame"}},
		}
		var got []engine.FieldMiss
		for _, r := range allow {
			if r.Matched {
				t.Errorf("rule %d matched", r.Rule)
			}
			got = append(got, r.Misses...)
		}
		if len(got) != len(want) {
			t.Fatalf("misses %+v", got)
		}
		for i, w := range want {
			g := got[i]
			if g.Field != w.field || g.Attribute != w.attr || (g.Value == nil) != (w.value == nil) || g.Value != nil && *g.Value != *w.value || strings.Join(g.Wanted, ",") != strings.Join(w.wanted, ",") {
				t.Errorf("miss %d = %+v, want %+v", i, g, w)
			}
		}
	})
	t.Run("tcp", func(t *testing.T) {
		req := casefile.Request{TCP: true}
		ex, err := set.Explain(ctx, req.CheckRequest())
		if err != nil {
			t.Fatal(err)
		}
		// The DENY rule loses its paths over TCP and matches on notPorts
		// alone: port 8080 is not 9090.
		deny := ex.Policies[0]
		if !deny.Matched || !deny.Decides || strings.Join(deny.Rules[0].DroppedForTCP, ",") != "spec.rules[0].to[0].operation.paths" {
			t.Errorf("deny: %+v", deny)
		}
		allow := ex.Policies[1].Rules
		if !allow[0].SkippedForTCP || allow[1].SkippedForTCP || !allow[2].SkippedForTCP {
			t.Errorf("ALLOW rules skipped for TCP: %+v", allow)
		}
		if ex.Decision.Reason != engine.ReasonDenyMatched || ex.Decision.Policy != "foo/deny-debug" {
			t.Errorf("decision %+v", ex.Decision)
		}
	})
	t.Run("no destination", func(t *testing.T) {
		req := casefile.Request{Destination: &casefile.Peer{Principal: ptr("spiffe://cluster.local/vm/db")}}
		ex, err := set.Explain(ctx, req.CheckRequest())
		if err != nil {
			t.Fatal(err)
		}
		if ex.Evaluated || ex.Decision.Allowed || ex.Decision.Reason != engine.ReasonEvaluationError || ex.Note == "" {
			t.Errorf("explanation %+v, decision %+v", ex, ex.Decision)
		}
	})
}

// TestExplainRefusesADisagreement: an explanation whose fields do not add
// up to the engine's matches is refused, never printed.
func TestExplainRefusesADisagreement(t *testing.T) {
	if !errors.Is(engine.ExplainDisagreementForTest(), engine.ErrExplanationDisagrees) {
		t.Fatal("a field trace that disagrees with the engine is not refused")
	}
}

func ptr[T any](v T) *T { return &v }
