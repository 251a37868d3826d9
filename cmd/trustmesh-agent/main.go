// Command trustmesh-agent is the workload agent alone: the same command as
// `trustmesh agent` (agent/cli), in a binary that holds none of the control
// plane. Injected pods run it, so each sidecar maps a fraction of trustmesh.
package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/trustmesh/trustmesh/agent/cli"
	"github.com/trustmesh/trustmesh/internal/grpclog"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

func main() {
	// grpc-go's logs go through slog at their own level, in the agent's
	// format, as they do under trustmesh agent.
	grpclog.Install(slog.New(slog.NewTextHandler(os.Stderr, nil)))
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:])
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "trustmesh-agent:", err)
		os.Exit(1)
	}
}

func run(ctx context.Context, args []string) error {
	cmd := cli.NewCommand("trustmesh-agent")
	cmd.Version = version
	cmd.SilenceUsage = true
	cmd.SilenceErrors = true
	cmd.SetArgs(args)
	return cmd.ExecuteContext(ctx)
}
