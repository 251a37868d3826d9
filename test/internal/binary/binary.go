// Package binary builds the programs that end-to-end tests run as real
// processes: the trustmesh binary, and small helper programs standing in
// for workloads.
package binary

import (
	"fmt"
	"os"
	"os/exec"
	"path"
	"path/filepath"
)

// Trustmesh is the import path of the trustmesh command.
const Trustmesh = "github.com/trustmesh/trustmesh/cmd/trustmesh"

// Build compiles the main package pkg (an import path) into dir and returns
// the executable's path, named after the package's last element. The
// compiler's output goes to stderr, so that a failed build says why.
func Build(dir, pkg string) (string, error) {
	out := filepath.Join(dir, path.Base(pkg))
	cmd := exec.Command("go", "build", "-o", out, pkg)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return "", fmt.Errorf("building %s: %w", pkg, err)
	}
	return out, nil
}

// BuildTrustmesh returns the trustmesh binary to test: the one the
// environment variable env names (another build, such as an older
// release), else one built from this tree into dir.
func BuildTrustmesh(dir, env string) (string, error) {
	if env != "" {
		if p := os.Getenv(env); p != "" {
			if _, err := os.Stat(p); err != nil {
				return "", fmt.Errorf("%s: %w", env, err)
			}
			return p, nil
		}
	}
	return Build(dir, Trustmesh)
}
