// Package arch checks the rules the layout keeps (ARCHITECTURE.md): which
// parts of trustmesh may import which, tests included, and the size of the
// composition root's files.
package arch

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"go/parser"
	"go/token"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"testing"
)

const module = "github.com/trustmesh/trustmesh"

// A rule forbids the packages under From, tests included, to reach any
// package under To, directly or through other packages of the module.
type rule struct {
	name     string
	from, to []string
}

var rules = []rule{
	{"ca imports nothing of authz, xds, injector or controlplane",
		[]string{"ca"}, []string{"authz", "xds", "injector", "controlplane"}},
	{"authz does not import xds",
		[]string{"authz"}, []string{"xds"}},
	{"mesh imports no consumer",
		[]string{"mesh"}, []string{"ca", "authz", "xds", "injector", "agent", "controlplane", "demo"}},
	{"xds does not import controlplane, ca or agent",
		[]string{"xds"}, []string{"controlplane", "ca", "agent"}},
	{"agent imports nothing of ca, authz, injector or controlplane; it reaches the CA over the wire only",
		[]string{"agent"}, []string{"ca", "authz", "injector", "controlplane"}},
	{"agent takes the mesh and its configuration over the wire (the node service, xDS), never from mesh or xds",
		[]string{"agent"}, []string{"mesh", "xds"}},
	{"check is a reader: it imports nothing of controlplane, agent, injector or demo",
		[]string{"check"}, []string{"controlplane", "agent", "injector", "demo"}},
	{"admission validates with the engine's and the mesh's own checks: it imports nothing of ca, xds, agent, injector or controlplane",
		[]string{"admission"}, []string{"ca", "xds", "agent", "injector", "controlplane"}},
	{"analyze is a reader of policies and the mesh: it imports nothing of ca, xds, agent, injector, controlplane or demo",
		[]string{"analyze"}, []string{"ca", "xds", "agent", "injector", "controlplane", "demo"}},
	{"ui shows what the components hand it through its own interfaces: it imports nothing of controlplane, agent, injector, xds, admission, analyze or demo",
		[]string{"ui"}, []string{"controlplane", "agent", "injector", "xds", "admission", "analyze", "demo"}},
	{"internal/tracing is shared kit: it imports no component",
		[]string{"internal/tracing"}, []string{"ca", "authz", "xds", "mesh", "agent", "injector", "controlplane", "admission", "analyze", "ui", "check", "demo"}},
}

// controlplaneImporters may import controlplane directly: the composition
// root itself, the binary and the demo built from its Config, and the
// suites that run it whole (the fault suites inject faults into a control
// plane run in process where the fault cannot come from outside).
var controlplaneImporters = []string{"controlplane", "cmd/trustmesh", "demo", "test/e2e", "test/adversary", "test/faults"}

// maxControlplaneLines bounds each non-test file of controlplane/.
const maxControlplaneLines = 450

func TestImportRules(t *testing.T) {
	g := loadGraph(t)
	for _, v := range g.check() {
		t.Error(v)
	}
}

func TestControlplaneFilesAreSmall(t *testing.T) {
	root := moduleRoot(t)
	for _, v := range longFiles(t, filepath.Join(root, "controlplane"), root) {
		t.Error(v)
	}
}

// TestRulesCatchViolations runs the checker on a made-up module, so that a
// rule that could never fire is caught here rather than trusted.
func TestRulesCatchViolations(t *testing.T) {
	g := graph{
		"mesh":             {prod: imports{"internal/watch": {"mesh/file.go"}}},
		"internal/watch":   {prod: imports{"internal/run": {"internal/watch/watch.go"}}},
		"internal/run":     {test: imports{"authz/policy": {"internal/run/run_test.go"}}},
		"ca/admin":         {test: imports{"xds": {"ca/admin/admin_test.go"}}},
		"xds":              {prod: imports{"authz/rbac": {"xds/server.go"}}},
		"xds/demo":         {prod: imports{"controlplane": {"xds/demo/demo.go"}}},
		"authz/rbac":       {prod: imports{"mesh": {"authz/rbac/rbac.go"}}},
		"agent/x":          {prod: imports{"cmd/trustmesh": {"agent/x/x.go"}}},
		"cmd/trustmesh":    {prod: imports{"controlplane": {"cmd/trustmesh/serve.go"}}},
		"test/e2e":         {test: imports{"controlplane": {"test/e2e/e2e_test.go"}}},
		"bench/x":          {prod: imports{"controlplane": {"bench/x/main.go"}}},
		"controlplane":     {prod: imports{"ca": {"controlplane/ca.go"}}},
		"ca":               {},
		"authz/policy":     {},
		"admission":        {prod: imports{"injector/webhook": {"admission/handler.go"}}},
		"injector/webhook": {},
		"analyze/x":        {test: imports{"ca/admin": {"analyze/x/x_test.go"}}},
	}
	got := g.check()
	want := []string{
		// A test file of a dependency is not compiled into its importers.
		"ca imports nothing of authz, xds, injector or controlplane: ca/admin/admin_test.go imports xds",
		"xds does not import controlplane, ca or agent: xds/demo/demo.go imports controlplane",
		"agent imports nothing of ca, authz, injector or controlplane; it reaches the CA over the wire only: " +
			"agent/x/x.go imports cmd/trustmesh, which imports (cmd/trustmesh/serve.go) controlplane",
		"nothing imports cmd/: agent/x/x.go imports cmd/trustmesh",
		"admission validates with the engine's and the mesh's own checks: it imports nothing of ca, xds, agent, injector or controlplane: " +
			"admission/handler.go imports injector/webhook",
		"analyze is a reader of policies and the mesh: it imports nothing of ca, xds, agent, injector, controlplane or demo: " +
			"analyze/x/x_test.go imports ca/admin",
		"only controlplane, cmd/trustmesh, demo, test/e2e, test/adversary, test/faults may import controlplane: bench/x/main.go imports controlplane",
		"only controlplane, cmd/trustmesh, demo, test/e2e, test/adversary, test/faults may import controlplane: xds/demo/demo.go imports controlplane",
	}
	for _, w := range want {
		if !slices.Contains(got, w) {
			t.Errorf("missing violation %q", w)
		}
	}
	// mesh reaches authz/policy only through a test file of internal/run,
	// which mesh does not compile.
	for _, v := range got {
		if strings.HasPrefix(v, "mesh ") {
			t.Errorf("false violation %q", v)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d violations, want %d:\n%s", len(got), len(want), strings.Join(got, "\n"))
	}

	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "big.go"), bytes.Repeat([]byte("\n"), maxControlplaneLines+1), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "big_test.go"), bytes.Repeat([]byte("\n"), 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ok.go"), bytes.Repeat([]byte("\n"), maxControlplaneLines), 0o600); err != nil {
		t.Fatal(err)
	}
	if got := longFiles(t, dir, dir); len(got) != 1 || !strings.Contains(got[0], "big.go has 451 lines") {
		t.Errorf("long files %q, want big.go alone", got)
	}
}

// imports maps an imported package of the module to the files that import
// it. Paths are relative to the module.
type imports map[string][]string

type pkg struct {
	prod imports // from the files built into the package
	test imports // from its _test.go files, in package p or p_test
}

type graph map[string]*pkg

// check returns every violation of the rules, each with its import chain.
func (g graph) check() []string {
	var out []string
	for _, path := range g.sorted() {
		for _, r := range rules {
			if !under(path, r.from) {
				continue
			}
			for _, chain := range g.reach(path, r.to) {
				out = append(out, r.name+": "+chain)
			}
		}
		p := g[path]
		for _, imp := range p.all() {
			files := append(slices.Clone(p.prod[imp]), p.test[imp]...)
			if under(imp, []string{"cmd"}) {
				out = append(out, fmt.Sprintf("nothing imports cmd/: %s imports %s", files[0], imp))
			}
			if under(imp, []string{"controlplane"}) && !under(path, controlplaneImporters) {
				out = append(out, fmt.Sprintf("only %s may import controlplane: %s imports %s",
					strings.Join(controlplaneImporters, ", "), files[0], imp))
			}
		}
	}
	return out
}

// reach finds the packages under to that from reaches: through the imports
// of its files and tests, then through the non-test imports of each package
// on the way. It returns one shortest chain per package reached.
func (g graph) reach(from string, to []string) []string {
	type step struct {
		prev string // "" for the imports of from itself
		file string // the file of prev (or from) that imports the package
	}
	seen := map[string]step{}
	var queue []string
	p := g[from]
	for _, imp := range p.all() {
		if imp == from {
			continue
		}
		f := append(slices.Clone(p.prod[imp]), p.test[imp]...)[0]
		seen[imp] = step{file: f}
		queue = append(queue, imp)
	}
	var out []string
	for len(queue) > 0 {
		cur := queue[0]
		queue = queue[1:]
		if under(cur, to) {
			// The chain from "from" to cur, read backwards.
			var links []string
			for n := cur; ; {
				s := seen[n]
				if s.prev == "" {
					links = append(links, s.file+" imports "+n)
					break
				}
				links = append(links, fmt.Sprintf("which imports (%s) %s", s.file, n))
				n = s.prev
			}
			slices.Reverse(links)
			out = append(out, strings.Join(links, ", "))
			continue // what cur imports in turn is its own rule's business
		}
		next := g[cur]
		if next == nil {
			continue
		}
		for _, imp := range sortedKeys(next.prod) {
			if _, ok := seen[imp]; ok || imp == from {
				continue
			}
			seen[imp] = step{prev: cur, file: next.prod[imp][0]}
			queue = append(queue, imp)
		}
	}
	return out
}

func (p *pkg) all() []string {
	set := map[string]bool{}
	for k := range p.prod {
		set[k] = true
	}
	for k := range p.test {
		set[k] = true
	}
	return sortedKeys(set)
}

func (g graph) sorted() []string { return sortedKeys(g) }

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

// under reports whether path is one of prefixes or inside one.
func under(path string, prefixes []string) bool {
	for _, p := range prefixes {
		if path == p || strings.HasPrefix(path, p+"/") {
			return true
		}
	}
	return false
}

// goTool is the go command that built this test, else the one on PATH.
func goTool() string {
	if p := filepath.Join(runtime.GOROOT(), "bin", "go"); fileExists(p) {
		return p
	}
	return "go"
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func moduleRoot(t *testing.T) string {
	t.Helper()
	out, err := exec.Command(goTool(), "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		t.Fatal("not inside the module")
	}
	return filepath.Dir(gomod)
}

// loadGraph lists the module's packages with `go list` and reads the import
// clauses of their files, tests included.
func loadGraph(t *testing.T) graph {
	t.Helper()
	root := moduleRoot(t)
	cmd := exec.Command(goTool(), "list", "-e",
		"-json=ImportPath,Dir,GoFiles,CgoFiles,TestGoFiles,XTestGoFiles,Error", "./...")
	cmd.Dir = root
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, stderr.String())
	}
	type listed struct {
		ImportPath, Dir                              string
		GoFiles, CgoFiles, TestGoFiles, XTestGoFiles []string
		Error                                        *struct{ Err string }
	}
	g := graph{}
	fset := token.NewFileSet()
	dec := json.NewDecoder(bytes.NewReader(out))
	for {
		var l listed
		if err := dec.Decode(&l); errors.Is(err, io.EOF) {
			break
		} else if err != nil {
			t.Fatalf("go list output: %v", err)
		}
		if l.Error != nil {
			t.Errorf("package %s does not load, so its imports are not checked: %s", l.ImportPath, l.Error.Err)
		}
		path, ok := rel(l.ImportPath)
		if !ok {
			continue
		}
		p := &pkg{prod: imports{}, test: imports{}}
		read := func(files []string, into imports) {
			for _, f := range files {
				name := filepath.Join(l.Dir, f)
				af, err := parser.ParseFile(fset, name, nil, parser.ImportsOnly)
				if err != nil {
					t.Errorf("parse %s: %v", name, err)
					continue
				}
				relName, _ := filepath.Rel(root, name)
				for _, spec := range af.Imports {
					ip, _ := strconv.Unquote(spec.Path.Value)
					if r, ok := rel(ip); ok && r != path {
						into[r] = append(into[r], filepath.ToSlash(relName))
					}
				}
			}
		}
		read(append(slices.Clone(l.GoFiles), l.CgoFiles...), p.prod)
		read(append(slices.Clone(l.TestGoFiles), l.XTestGoFiles...), p.test)
		g[path] = p
	}
	if len(g) < 10 {
		t.Fatalf("go list found %d packages; is this the module?", len(g))
	}
	return g
}

// rel is an import path relative to the module, if it is the module's.
func rel(importPath string) (string, bool) {
	if importPath == module {
		return ".", true
	}
	r, ok := strings.CutPrefix(importPath, module+"/")
	return r, ok
}

// longFiles lists the non-test Go files under dir longer than
// maxControlplaneLines, named relative to root.
func longFiles(t *testing.T, dir, root string) []string {
	t.Helper()
	var out []string
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if d.Name() == "testdata" {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		n := bytes.Count(b, []byte("\n"))
		if len(b) > 0 && b[len(b)-1] != '\n' {
			n++
		}
		if n > maxControlplaneLines {
			r, _ := filepath.Rel(root, p)
			out = append(out, fmt.Sprintf("no non-test file in controlplane/ is over %d lines: %s has %d lines",
				maxControlplaneLines, filepath.ToSlash(r), n))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}
