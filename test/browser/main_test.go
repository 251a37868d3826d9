// Package browser tests the web UI of `trustmesh serve` in a real browser:
// Debian's Chromium, headless, driven over the DevTools protocol with
// chromedp, against the built binary running as a process with real
// agents enrolled. axe-core, installed from npm by `make test` (npm ci in
// this directory), checks each view for WCAG A and AA violations.
//
//	make test                      # installs chromium and axe-core, then runs these
//	go test ./test/browser/        # skips when either is missing
//
// TRUSTMESH_BROWSER_TESTS=1 (set by make test) turns a missing Chromium or
// axe-core into a failure. TRUSTMESH_SCREENSHOTS names the directory the
// views' screenshots are written to (default: a temporary directory, kept
// and logged). TRUSTMESH_CHROMIUM overrides /usr/bin/chromium.
package browser

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

var (
	// bin is the trustmesh binary, built once by TestMain.
	bin string
	// chromium is the browser's executable.
	chromium string
	// axeSource is node_modules/axe-core/axe.min.js.
	axeSource string
	// skipReason is why the tests cannot run here; "" when they can.
	skipReason string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	required := os.Getenv("TRUSTMESH_BROWSER_TESTS") == "1"
	if err := findTools(); err != nil {
		if required {
			fmt.Fprintf(os.Stderr, "browser tests: %v (TRUSTMESH_BROWSER_TESTS=1: make test installs both; run it, or hack/debian-tools.sh chromium and npm ci in test/browser)\n", err)
			return 1
		}
		skipReason = err.Error() + "; make test installs it (hack/debian-tools.sh chromium, npm ci in test/browser)"
		return m.Run()
	}
	dir, err := os.MkdirTemp("", "trustmesh-browser-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin = filepath.Join(dir, "trustmesh")
	build := exec.Command("go", "build", "-o", bin, "github.com/trustmesh/trustmesh/cmd/trustmesh")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "browser tests: building trustmesh:", err)
		return 1
	}
	code := m.Run()
	stopShared()
	return code
}

// findTools finds Chromium and axe-core.
func findTools() error {
	chromium = os.Getenv("TRUSTMESH_CHROMIUM")
	if chromium == "" {
		chromium = "/usr/bin/chromium"
	}
	if _, err := exec.LookPath(chromium); err != nil {
		return fmt.Errorf("no Chromium at %s: %w", chromium, err)
	}
	axe, err := filepath.Abs(filepath.Join("node_modules", "axe-core", "axe.min.js"))
	if err != nil {
		return err
	}
	b, err := os.ReadFile(axe)
	if err != nil {
		return fmt.Errorf("no axe-core: %w", err)
	}
	if len(b) == 0 {
		return errors.New("axe-core's axe.min.js is empty")
	}
	axeSource = string(b)
	return nil
}

// needTools skips the test when the tools are missing and not required.
func needTools(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
	if testing.Short() {
		t.Skip("runs trustmesh serve, two agents and Chromium")
	}
}
