// Command crdgen writes the Helm chart's Istio CRDs, extracted from the
// istio.io/api module at the version go.mod requires:
//
//	go run ./hack/crdgen
//
// It finds the module with `go list -m`, so run it from the repository.
package main

import (
	"bytes"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"

	"github.com/trustmesh/trustmesh/deploy/crds"
)

func main() {
	out := flag.String("o", "deploy/charts/trustmesh/files/crds.gen.yaml", "file to write")
	flag.Parse()
	if err := run(*out); err != nil {
		fmt.Fprintln(os.Stderr, "crdgen:", err)
		os.Exit(1)
	}
}

func run(out string) error {
	cmd := exec.Command("go", "list", "-m", "-json", crds.Module)
	cmd.Stderr = os.Stderr
	raw, err := cmd.Output()
	if err != nil {
		return fmt.Errorf("go list -m %s: %w", crds.Module, err)
	}
	var mod struct{ Version, Dir string }
	if err := json.Unmarshal(raw, &mod); err != nil {
		return fmt.Errorf("go list -m %s: %w", crds.Module, err)
	}
	if mod.Dir == "" {
		return fmt.Errorf("module %s@%s is not downloaded; run go mod download %s", crds.Module, mod.Version, crds.Module)
	}
	src, err := os.ReadFile(filepath.Join(mod.Dir, crds.File))
	if err != nil {
		return err
	}
	gen, err := crds.Extract(bytes.NewReader(src), mod.Version, crds.Names)
	if err != nil {
		return err
	}
	return os.WriteFile(out, gen, 0o644)
}
