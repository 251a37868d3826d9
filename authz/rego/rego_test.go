package rego

import (
	"flag"
	"os"
	"strings"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"

	"github.com/trustmesh/trustmesh/authz/policy"
)

var update = flag.Bool("update", false, "rewrite the golden files")

// TestGolden pins the Rego generated for the examples; refresh with
// -update and review the diff like code. Every module must also parse.
func TestGolden(t *testing.T) {
	for _, name := range []string{"10-bookinfo", "20-database-tcp"} {
		t.Run(name, func(t *testing.T) {
			raw, err := os.ReadFile("../../examples/policies/" + name + ".yaml")
			if err != nil {
				t.Fatal(err)
			}
			ps, err := policy.ParseYAML(name+".yaml", raw, "default")
			if err != nil {
				t.Fatal(err)
			}
			var b strings.Builder
			for i, p := range ps {
				m := Module(ID(i), p)
				if _, err := ast.ParseModuleWithOpts(ID(i), m, ast.ParserOptions{RegoVersion: ast.RegoV1}); err != nil {
					t.Fatalf("generated module does not parse: %v\n%s", err, m)
				}
				b.WriteString(m)
				b.WriteString("\n")
			}
			golden := "testdata/" + name + ".rego.golden"
			if *update {
				if err := os.WriteFile(golden, []byte(b.String()), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if string(want) != b.String() {
				t.Errorf("%s differs; run with -update and review:\n%s", golden, b.String())
			}
		})
	}
}

// TestExplainModule: the explain module is the policy's module, unchanged,
// followed by rules made of the same field expressions.
func TestExplainModule(t *testing.T) {
	raw, err := os.ReadFile("../../examples/policies/10-bookinfo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ps, err := policy.ParseYAML("10-bookinfo.yaml", raw, "default")
	if err != nil {
		t.Fatal(err)
	}
	for i, p := range ps {
		m, x := Module(ID(i), p), ExplainModule(ID(i), p)
		if !strings.HasPrefix(x, m) {
			t.Fatalf("%s: the explain module does not start with the module", p.Key())
		}
		if _, err := ast.ParseModuleWithOpts(ID(i), x, ast.ParserOptions{RegoVersion: ast.RegoV1}); err != nil {
			t.Fatalf("%s: explain module does not parse: %v\n%s", p.Key(), err, x)
		}
		for _, r := range p.Rules {
			r.EachField(func(f policy.Field) {
				if !strings.Contains(x, "explain_http contains "+quote(f.Name)+" if {") {
					t.Errorf("%s: no explain rule for %s", p.Key(), f.Name)
				}
			})
		}
	}
}
