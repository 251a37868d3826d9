// Command trustmesh is the single trustmesh binary. It only wires flags to
// components; the behaviour lives in the component packages.
package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/internal/grpclog"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

// exitError carries a process exit code through cobra.
type exitError struct {
	code int
	err  error
}

func (e *exitError) Error() string { return e.err.Error() }
func (e *exitError) Unwrap() error { return e.err }

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "trustmesh:", err)
		var ee *exitError
		if errors.As(err, &ee) {
			os.Exit(ee.code)
		}
		os.Exit(1)
	}
}

func newRootCmd() *cobra.Command {
	root := &cobra.Command{
		Use:           "trustmesh",
		Short:         "A SPIFFE CA and zero-trust policy engine for service meshes",
		SilenceUsage:  true,
		SilenceErrors: true,
		// grpc-go's logs go through slog, at their level and in the
		// command's log format, instead of grpc-go's own stderr lines.
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			log, err := grpcLogger(cmd)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			grpclog.Install(log)
			return nil
		},
	}
	root.AddCommand(
		newVersionCmd(),
		newServeCmd(),
		newCACmd(),
		newAuditCmd(),
		newPolicyCmd(),
		newAuthzCmd(),
		newAgentCmd(),
		newInjectCmd(),
		newXDSCmd(),
		newDemoCmd(),
		newCheckCmd(),
		newAnalyzeCmd(),
	)
	return root
}

// grpcLogger is the logger the command logs with: its --log-format and
// --log-level when it has them, else text at info on stderr.
func grpcLogger(cmd *cobra.Command) (*slog.Logger, error) {
	format, level := "text", "info"
	if f := cmd.Flags().Lookup("log-format"); f != nil {
		format = f.Value.String()
	}
	if f := cmd.Flags().Lookup("log-level"); f != nil {
		level = f.Value.String()
	}
	return newLogger(format, level)
}

func newVersionCmd() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print the trustmesh version",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			_, err := fmt.Fprintln(cmd.OutOrStdout(), "trustmesh", version)
			return err
		},
	}
}
