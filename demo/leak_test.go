package demo_test

import (
	"os"
	"testing"

	"github.com/trustmesh/trustmesh/test/leakcheck"
)

// TestMain fails a passing run that leaves goroutines of trustmesh's own
// code (the control plane, the agents, the xDS server). grpc-go leaves
// running the pemfile watchers its xDS bootstraps start (seen in these
// tests after every client and server closed), so library goroutines are
// not counted.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		code = leakcheck.CheckOurs(os.Stderr)
	}
	os.Exit(code)
}
