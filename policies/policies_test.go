// Package policies holds the Rego bundles that ship with trustmesh. This
// test runs each bundle's *_test.rego files as `opa test` would, compiled
// with the same sandbox the engine uses, and loads each bundle through the
// engine's loader so a bundle that the server would refuse fails here.
package policies

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/tester"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
)

func TestBundles(t *testing.T) {
	entries, err := os.ReadDir(".")
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		if !e.IsDir() {
			continue
		}
		n++
		dir := e.Name()
		t.Run(dir, func(t *testing.T) {
			if _, err := source.LoadBundle(source.BundleConfig{Path: dir}); err != nil {
				t.Fatalf("the engine refuses the bundle: %v", err)
			}
			modules, store, err := tester.Load([]string{dir}, nil)
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			ch, err := tester.NewRunner().
				SetCompiler(ast.NewCompiler().WithCapabilities(engine.Sandbox())).
				SetStore(store).
				Run(ctx, modules)
			if err != nil {
				t.Fatal(err)
			}
			tests := 0
			for r := range ch {
				tests++
				if r.Fail || r.Error != nil {
					t.Errorf("%s.%s (%s): fail=%v error=%v", r.Package, r.Name, r.Location, r.Fail, r.Error)
				}
			}
			if tests == 0 {
				t.Fatalf("bundle %s has no Rego tests", filepath.Clean(dir))
			}
		})
	}
	if n == 0 {
		t.Fatal("no bundles")
	}
}
