package main

import (
	"errors"
	"time"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/demo"
)

func newDemoCmd() *cobra.Command {
	var cfg demo.Config
	var logFormat, logLevel string
	var ambient bool
	cmd := &cobra.Command{
		Use:   "demo",
		Short: "Run a mesh on one machine: the control plane and two proxyless gRPC workloads",
		Long: `Start, in one process, the CA and the xDS server, two agents enrolled with
join tokens, and two proxyless grpc-go workloads (an echo server and its
client) that get their certificates from the agents and their configuration,
mTLS and RBAC included, from the xDS server. Every call, policy push, refused
policy edit and certificate rotation is printed as it happens.

The mesh (examples/mesh in the source) is built into the binary, so the demo
runs from any directory: it is copied to the work directory, and the demo
prints the path of the policy file to edit while it runs to see calls denied
and allowed again. --mesh and --policies run it on your own files instead.
Ctrl-C stops it.

--ambient (Linux, as root) shows ambient mode instead: two pods as network
namespaces on a bridge, declared ambient workloads of one node, the control
plane and the node agent with its L4 proxy in this process, and two
unmodified TCP apps in the pods, an echo server and a client calling it
every --interval through the node proxy (HBONE, mTLS, the policy asked
about every connection). It prints the policy file to edit to deny the
client. Ctrl-C removes every namespace it made, with the rules in them.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logFormat, logLevel)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			cfg.Log, cfg.Out = log, cmd.OutOrStdout()
			if ambient {
				if cmd.Flags().Changed("mesh") || cmd.Flags().Changed("policies") || cmd.Flags().Changed("cert-ttl") {
					return &exitError{code: 2, err: errors.New("--ambient writes its own mesh and policy and takes neither --mesh, --policies nor --cert-ttl")}
				}
				err := demo.RunAmbient(cmd.Context(), demo.AmbientConfig{WorkDir: cfg.WorkDir, Interval: cfg.Interval, Out: cfg.Out, Log: log})
				if errors.Is(err, demo.ErrNeedsRoot) {
					return &exitError{code: 2, err: err}
				}
				return err
			}
			return demo.Run(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.MeshDir, "mesh", "", "directory of mesh YAML files, watched (default: a copy of the built-in mesh in the work directory)")
	f.StringVar(&cfg.PoliciesDir, "policies", "", "directory of AuthorizationPolicy YAML files, watched (default: the mesh directory's policies/)")
	f.StringVar(&cfg.WorkDir, "work-dir", "", "directory for the CA's data, the agents' files and the copy of the mesh; a mesh copied there on an earlier run is kept (default: a temporary directory, removed at the end)")
	f.DurationVar(&cfg.CertTTL, "cert-ttl", time.Minute, "workload certificate lifetime; they rotate at half of it")
	f.DurationVar(&cfg.Interval, "interval", time.Second, "time between calls")
	f.BoolVar(&ambient, "ambient", false, "ambient mode instead: pods as network namespaces, unmodified TCP apps, the node agent's L4 proxy between them (Linux, root)")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "error", "log level of the components: debug, info, warn or error")
	return cmd
}
