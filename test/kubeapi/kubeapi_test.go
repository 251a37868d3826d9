package kubeapi

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

var shared Shared

func TestMain(m *testing.M) { shared.Main(m) }

const leakEnv = "KUBEAPI_TEST_LEAK"

// TestLeaks runs only inside TestMainFailsOnLeak: it passes and leaves a
// goroutine of ours running.
func TestLeaks(t *testing.T) {
	if os.Getenv(leakEnv) == "" {
		t.Skip("run by TestMainFailsOnLeak")
	}
	go func() { select {} }()
}

// Main turns a passing run that leaks a trustmesh goroutine into a failure.
func TestMainFailsOnLeak(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^TestLeaks$", "-test.count=1")
	cmd.Env = append(os.Environ(), leakEnv+"=1")
	out, err := cmd.CombinedOutput()
	if _, exited := err.(*exec.ExitError); !exited {
		t.Fatalf("a leaking run exited with %v, want a failure:\n%s", err, out)
	}
	if !strings.Contains(string(out), "leakcheck:") || !strings.Contains(string(out), "kubeapi.TestLeaks") {
		t.Errorf("the failure does not name the leaked goroutine:\n%s", out)
	}
}
