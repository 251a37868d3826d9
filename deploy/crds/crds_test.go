package crds_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/deploy/crds"
)

// source returns the CRD file of the istio.io/api version go.mod requires.
func source(t *testing.T) ([]byte, string) {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-json", crds.Module).Output()
	if err != nil {
		t.Fatalf("go list -m %s: %v", crds.Module, err)
	}
	var mod struct{ Version, Dir string }
	if err := json.Unmarshal(out, &mod); err != nil {
		t.Fatal(err)
	}
	src, err := os.ReadFile(filepath.Join(mod.Dir, crds.File))
	if err != nil {
		t.Fatal(err)
	}
	return src, mod.Version
}

// TestGeneratedIsCurrent keeps the chart's CRDs equal to a fresh
// extraction: run `go run ./hack/crdgen` after changing istio.io/api.
func TestGeneratedIsCurrent(t *testing.T) {
	src, version := source(t)
	want, err := crds.Extract(bytes.NewReader(src), version, crds.Names)
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.ReadFile("../charts/trustmesh/files/crds.gen.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatal("deploy/charts/trustmesh/files/crds.gen.yaml is stale: run go run ./hack/crdgen")
	}
	// Each is a well-formed CRD, unchanged but for its labels.
	docs := strings.Split(string(got), "\n---\n")[1:]
	if len(docs) != len(crds.Names) {
		t.Fatalf("%d documents, want %d", len(docs), len(crds.Names))
	}
	for i, doc := range docs {
		var crd apiextensionsv1.CustomResourceDefinition
		if err := yaml.UnmarshalStrict([]byte(doc), &crd); err != nil {
			t.Fatal(err)
		}
		if crd.Name != crds.Names[i] {
			t.Errorf("document %d is %s, want %s", i, crd.Name, crds.Names[i])
		}
		if crd.Annotations["helm.sh/resource-policy"] != "keep" {
			t.Errorf("%s loses helm.sh/resource-policy: keep", crd.Name)
		}
		if len(crd.Spec.Versions) == 0 || crd.Spec.Versions[0].Schema == nil {
			t.Errorf("%s has no schema", crd.Name)
		}
	}
}

func TestExtractRefuses(t *testing.T) {
	src, version := source(t)
	for name, tc := range map[string]struct {
		src   []byte
		names []string
	}{
		"missing CRD":    {src, []string{"gateways.gateway.networking.k8s.io"}},
		"duplicated CRD": {append(append(src, "\n---\n"...), onlyFirst(t, src)...), crds.Names},
	} {
		if _, err := crds.Extract(bytes.NewReader(tc.src), version, tc.names); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
}

// onlyFirst returns the authorizationpolicies CRD document of src.
func onlyFirst(t *testing.T, src []byte) []byte {
	t.Helper()
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(src)))
	for {
		doc, err := r.Read()
		if err != nil {
			t.Fatal("authorizationpolicies not found")
		}
		if bytes.Contains(doc, []byte("name: authorizationpolicies.security.istio.io")) {
			return doc
		}
	}
}
