package demo_test

import (
	"log/slog"
	"os"
	"testing"

	grpcgrpclog "google.golang.org/grpc/grpclog"

	"github.com/trustmesh/trustmesh/internal/grpclog"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

// grpcLogs receives grpc-go's warnings and errors, through the adapter
// `trustmesh` installs at start.
var grpcLogs = &records{level: slog.LevelWarn}

// TestMain routes grpc-go's logs to grpcLogs, as cmd/trustmesh routes them
// to its logger, and fails a passing run that leaves goroutines of
// trustmesh's own code (the control plane, the agents, the xDS server).
// grpc-go leaves running the pemfile watchers its xDS bootstraps start
// (seen in these tests after every client and server closed), so library
// goroutines are not counted.
func TestMain(m *testing.M) {
	grpcgrpclog.SetLoggerV2(grpclog.New(slog.New(grpcLogs), 0))
	code := m.Run()
	if code == 0 {
		code = leakcheck.CheckOurs(os.Stderr)
	}
	os.Exit(code)
}
