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
	"strings"
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
		newNodeCmd(),
		newInjectCmd(),
		newXDSCmd(),
		newDemoCmd(),
		newCheckCmd(),
		newAnalyzeCmd(),
	)
	usageErrors(root)
	return root
}

// usageErrors makes every usage error of every command under c exit 2, in
// this one place: flag errors go through the flag error hook, which
// subcommands inherit, but cobra returns the errors of positional
// arguments, required flags and flag groups (MarkFlagsOneRequired,
// MarkFlagsMutuallyExclusive) as they are, so they would exit 1. A
// runnable command's Args is wrapped, and its PreRunE makes cobra's own
// flag checks first, which then find nothing. A command of subcommands
// (trustmesh, policy, ca, ...) would print its help and exit 0 on an
// unknown subcommand, so it is made runnable: it prints its help when
// called alone and refuses any argument.
func usageErrors(c *cobra.Command) {
	usage := func(err error) error {
		if err != nil {
			return &exitError{code: 2, err: err}
		}
		return nil
	}
	if c.Parent() == nil {
		c.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usage(err) })
		// cobra adds its help and completion commands only when it
		// executes, after this walk, so they would exit 0 on an unknown
		// topic or shell and 1 on an extra argument. Added now, they are
		// walked like the others (cobra keeps them when it executes). help
		// takes a path of commands, so its Args refuses a path that does not
		// name one.
		c.InitDefaultHelpCmd()
		c.InitDefaultCompletionCmd()
		for _, sub := range c.Commands() {
			if sub.Name() == "help" && sub.Args == nil {
				sub.Args = func(cmd *cobra.Command, a []string) error {
					found, rest, err := cmd.Root().Find(a)
					if err != nil {
						return err
					}
					if len(rest) > 0 {
						return fmt.Errorf("unknown help topic %q: %q has no command %q", strings.Join(a, " "), found.CommandPath(), rest[0])
					}
					return nil
				}
			}
		}
	}
	for _, sub := range c.Commands() {
		usageErrors(sub)
	}
	if !c.Runnable() {
		if !c.HasSubCommands() {
			return
		}
		c.Args = func(cmd *cobra.Command, a []string) error {
			if len(a) == 0 {
				return nil
			}
			err := fmt.Errorf("unknown command %q for %q", a[0], cmd.CommandPath())
			if s := cmd.SuggestionsFor(a[0]); len(s) > 0 {
				err = fmt.Errorf("%w; did you mean %s?", err, strings.Join(s, " or "))
			}
			return usage(err)
		}
		c.RunE = func(cmd *cobra.Command, _ []string) error { return cmd.Help() }
		return
	}
	args := c.Args
	if args == nil {
		args = cobra.NoArgs
	}
	c.Args = func(cmd *cobra.Command, a []string) error { return usage(args(cmd, a)) }
	pre := c.PreRunE
	c.PreRunE = func(cmd *cobra.Command, a []string) error {
		if err := cmd.ValidateRequiredFlags(); err != nil {
			return usage(err)
		}
		if err := cmd.ValidateFlagGroups(); err != nil {
			return usage(err)
		}
		if pre != nil {
			return pre(cmd, a)
		}
		return nil
	}
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
