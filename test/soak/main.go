// Command soak runs trustmesh's control plane for a long time under the
// load of a mesh and counts what must never happen (issue 14, "A soak").
// `make soak DURATION=30m` runs it through hack/soak.sh.
//
// Everything is real and on loopback: the trustmesh binary, built once,
// runs `trustmesh serve` with its own data directory, a mesh directory
// and a policy directory, and one `trustmesh agent` process per workload,
// each enrolled with its own join token and asking for short certificates.
// The soak itself is the workloads and the operator:
//
//   - proxyless gRPC pairs: a grpc-go xDS server and client, each with the
//     certificates its agent writes to its cert dir, call each other without
//     pause through the RBAC the xDS server derives from the policies;
//   - mTLS probe pairs: two go-spiffe workloads on two agents' Workload API
//     sockets make a full handshake per exchange and check every presented
//     certificate against the clock at the moment of verification;
//   - the operator rewrites the AuthorizationPolicy file every
//     -policy-every, flipping which pairs are allowed, so that the expected
//     outcome of every call is known; and rotates the intermediate with
//     `trustmesh ca rotate --prepare` then `--activate` every -rotate-every.
//
// It prints what it counted every -report-every and at the end, and exits
// 1 when a must-be-zero count is not zero or the control plane's RSS or
// goroutines grow; 2 when the soak could not be set up.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	cfg := defaultConfig()
	fs := flag.NewFlagSet("soak", flag.ContinueOnError)
	cfg.register(fs)
	if err := fs.Parse(os.Args[1:]); err != nil {
		os.Exit(2)
	}
	if err := cfg.validate(); err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	res, err := run(ctx, cfg, os.Stdout)
	if err != nil {
		fmt.Fprintln(os.Stderr, "soak:", err)
		os.Exit(2)
	}
	if failed := res.failures(); len(failed) > 0 {
		fmt.Fprintln(os.Stdout, "SOAK FAILED:")
		for _, f := range failed {
			fmt.Fprintln(os.Stdout, "  -", f)
		}
		os.Exit(1)
	}
	fmt.Fprintln(os.Stdout, "SOAK PASSED")
	if errors.Is(ctx.Err(), context.Canceled) {
		os.Exit(1) // interrupted: not the run asked for
	}
}
