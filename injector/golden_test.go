package injector_test

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/injector"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/inject")

func goldenInjector(t *testing.T) *injector.Injector {
	t.Helper()
	mesh, err := injector.LoadMeshConfig("testdata/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	inj, err := injector.New(injector.Config{Mesh: mesh})
	if err != nil {
		t.Fatal(err)
	}
	return inj
}

// TestGolden injects every manifest in testdata/inject and compares the
// result with its .injected file; -update rewrites them. Injecting the
// result again must change nothing.
func TestGolden(t *testing.T) {
	inj := goldenInjector(t)
	inputs, err := filepath.Glob("testdata/inject/*.yaml")
	if err != nil || len(inputs) == 0 {
		t.Fatalf("no inputs: %v", err)
	}
	for _, in := range inputs {
		t.Run(strings.TrimSuffix(filepath.Base(in), ".yaml"), func(t *testing.T) {
			src, err := os.ReadFile(in)
			if err != nil {
				t.Fatal(err)
			}
			var out bytes.Buffer
			if _, err := inj.InjectManifests(bytes.NewReader(src), &out); err != nil {
				t.Fatal(err)
			}
			golden := in + ".injected"
			if *update {
				if err := os.WriteFile(golden, out.Bytes(), 0o644); err != nil {
					t.Fatal(err)
				}
			}
			want, err := os.ReadFile(golden)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(out.Bytes(), want) {
				t.Errorf("%s differs from the injection (run with -update and review the diff):\n%s", golden, out.String())
			}

			var again bytes.Buffer
			results, err := inj.InjectManifests(bytes.NewReader(out.Bytes()), &again)
			if err != nil {
				t.Fatalf("reinjecting: %v", err)
			}
			for _, r := range results {
				if r.Result.Injected {
					t.Errorf("%s %s injected twice", r.Kind, r.Name)
				}
			}
			if !bytes.Equal(again.Bytes(), out.Bytes()) {
				t.Errorf("reinjection changed the manifest:\n%s", again.String())
			}
		})
	}
}
