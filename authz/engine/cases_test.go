package engine_test

import (
	"context"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/authz/casefile"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/engine/backendtest"
	"github.com/trustmesh/trustmesh/authz/source"
)

// loadCaseFile builds the Set a case file describes.
func loadCaseFile(t *testing.T, cf *casefile.File) (*engine.Set, error) {
	t.Helper()
	dir := t.TempDir()
	pdir := filepath.Join(dir, "policies")
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pdir, "policies.yaml"), []byte(cf.Policies), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := source.Config{
		Engine:        engine.New(),
		Policies:      &source.Dir{Path: pdir, DefaultNamespace: "default"},
		RootNamespace: cf.RootNamespace,
		Gateways:      engine.NewGatewayIDs(cf.Gateways...),
	}
	for name, b := range cf.Bundles {
		bdir := filepath.Join(dir, "bundles", name)
		for fn, content := range b.Files {
			p := filepath.Join(bdir, fn)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		cfg.Bundles = append(cfg.Bundles, source.BundleConfig{Path: bdir, RegoV0: b.RegoV0})
	}
	l, err := source.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return l.Build(context.Background())
}

// TestCases runs every authz/testdata/cases/*.yaml file on the native
// back end, which serves, and holds the Rego back end to the same
// decisions (policy, rule, reason, audit, dry run) and matching rules.
func TestCases(t *testing.T) {
	files, err := filepath.Glob("../testdata/cases/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no case files: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".yaml"), func(t *testing.T) {
			cf, err := casefile.Load(f)
			if err != nil {
				t.Fatal(err)
			}
			set, err := loadCaseFile(t, cf)
			if cf.LoadError != "" {
				if err == nil {
					t.Fatalf("load succeeded, want an error containing %q", cf.LoadError)
				}
				if !strings.Contains(err.Error(), cf.LoadError) {
					t.Fatalf("load error %q does not mention %q", err, cf.LoadError)
				}
				return
			}
			if err != nil {
				t.Fatalf("load: %v", err)
			}
			pair, err := backendtest.NewPair(context.Background(), set)
			if err != nil {
				t.Fatal(err)
			}
			x, err := set.Explainer(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			for _, c := range cf.Cases {
				t.Run(c.Name, func(t *testing.T) {
					d, err := set.Check(context.Background(), c.Request.CheckRequest())
					checkDecision(t, d, err, c.Want)
					for _, msg := range pair.Disagreements(context.Background(), c.Request.CheckRequest()) {
						t.Errorf("the back ends disagree: %s", msg)
					}
					// Explain explains the native decision with the Rego
					// back end's field outcomes, which must add up to it.
					ex, err := x.Explain(context.Background(), c.Request.CheckRequest())
					if err != nil {
						t.Fatalf("explain: %v", err)
					}
					if !reflect.DeepEqual(ex.Decision, d) {
						t.Errorf("explained decision %+v, Check's %+v", ex.Decision, d)
					}
				})
			}
		})
	}
}

func checkDecision(t *testing.T, d *engine.Decision, err error, w casefile.Want) {
	t.Helper()
	if (err != nil) != w.Error {
		t.Fatalf("error = %v, want error %v", err, w.Error)
	}
	if d.Allowed != w.Allowed {
		t.Fatalf("allowed = %v (%s, policy %q, error %q), want %v", d.Allowed, d.Reason, d.Policy, d.Error, w.Allowed)
	}
	if w.Policy != nil && d.Policy != *w.Policy {
		t.Errorf("policy = %q, want %q", d.Policy, *w.Policy)
	}
	if w.Rule != nil && (d.Rule == nil || *d.Rule != *w.Rule) {
		t.Errorf("rule = %v, want %d", deref(d.Rule), *w.Rule)
	}
	if w.Reason != "" && d.Reason != w.Reason {
		t.Errorf("reason = %q, want %q", d.Reason, w.Reason)
	}
	if w.Status != 0 && d.HTTPStatus != w.Status {
		t.Errorf("status = %d, want %d", d.HTTPStatus, w.Status)
	}
	for k, v := range w.Headers {
		found := false
		for _, h := range d.Headers {
			if h.Key == k && h.Value == v {
				found = true
			}
		}
		if !found {
			t.Errorf("headers %v lack %s: %s", d.Headers, k, v)
		}
	}
	if w.Body != "" && d.Body != w.Body {
		t.Errorf("body = %q, want %q", d.Body, w.Body)
	}
	if w.Audit != nil && !equalMatches(d.Audit, w.Audit) {
		t.Errorf("audit = %v, want %v", d.Audit, w.Audit)
	}
	if w.DryRunAllowed != nil && (d.DryRun == nil || d.DryRun.Allowed != *w.DryRunAllowed) {
		t.Errorf("dry run = %+v, want allowed %v", d.DryRun, *w.DryRunAllowed)
	}
}

func equalMatches(a, b []engine.Match) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func deref(p *int) any {
	if p == nil {
		return nil
	}
	return *p
}
