package analyze

import (
	"errors"
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/trustmesh/trustmesh/authz/source"
)

const loadFile = `# a comment before the first document
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: shop}
spec:
  rules:
  - from:
    - source:
        requestPrincipals: ["issuer/subject"]
---
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: good}
spec: {}
--- # a separator with a comment

# only a comment
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: bad-port, namespace: shop}
spec:
  rules:
  - to:
    - operation:
        ports: ["http"]
`

// TestAddFileVerbatim holds the loader's refusals to the engine parser's:
// each TMA000 message is, verbatim, the refusal of that document in a
// parse of the whole file (same document number, same line), and the
// file's good policy still loads.
func TestAddFileVerbatim(t *testing.T) {
	_, whole := source.ParseFile("p.yaml", []byte(loadFile), "default")
	joined, ok := whole.(interface{ Unwrap() []error })
	if !ok {
		t.Fatalf("ParseFile error %v: want one joined error per document", whole)
	}
	var want []string
	for _, e := range joined.Unwrap() {
		want = append(want, e.Error())
	}
	ps := &Policies{DefaultNamespace: "default"}
	ps.AddFile("p.yaml", []byte(loadFile))
	var got []string
	for _, f := range ps.Findings() {
		got = append(got, f.Message)
		if f.Code != CodeInvalid || f.Severity != SeverityError {
			t.Errorf("finding %+v: want %s error", f, CodeInvalid)
		}
	}
	if !slices.Equal(got, want) {
		t.Errorf("messages:\n got %q\nwant %q", got, want)
	}
	if len(ps.Policies()) != 1 || ps.Policies()[0].Key() != "default/good" {
		t.Errorf("policies = %v, want default/good", ps.Policies())
	}
}

// TestAddPathDirectory: a directory loads as the engine's Dir source reads
// it, source.ParseDir (a duplicate across files is refused with its words),
// and a refused file does not stop the next one.
func TestAddPathDirectory(t *testing.T) {
	dir := t.TempDir()
	write := func(name, data string) {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write("a.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {}\n")
	write("b.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: shop}\nspec: {}\n")
	write("c.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: q, namespace: shop}\nspec: {action: NOPE}\n")
	write("d.yaml", "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: r, namespace: shop}\nspec: {}\n")
	write("notes.txt", "not a policy")
	_, whole := source.ParseDir(dir, "default")

	ps := &Policies{DefaultNamespace: "default"}
	if err := ps.AddPath(dir); err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, p := range ps.Policies() {
		keys = append(keys, p.Key())
	}
	if !slices.Equal(keys, []string{"shop/p", "shop/r"}) {
		t.Errorf("policies = %v", keys)
	}
	if len(ps.Findings()) != 2 {
		t.Fatalf("findings = %+v, want the duplicate and the bad action", ps.Findings())
	}
	for _, f := range ps.Findings() {
		if !slices.ContainsFunc(whole.(interface{ Unwrap() []error }).Unwrap(), func(e error) bool { return e.Error() == f.Message }) {
			t.Errorf("finding %q is not one of ParseDir's refusals %v", f.Message, whole)
		}
	}
	if err := (&Policies{}).AddPath(filepath.Join(dir, "missing")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("missing path: err = %v", err)
	}
}
