// Package cli is the workload agent's command line: one definition of its
// flags, shared by `trustmesh agent` and by trustmesh-agent, the binary that
// holds the agent alone and that injected pods run. It only maps flags and
// environment to agent.Config.
package cli

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/agent"
	"github.com/trustmesh/trustmesh/agent/svid"
	"github.com/trustmesh/trustmesh/api/probe"
)

// NewCommand returns the agent's command, named use: "agent" as a
// subcommand of trustmesh, "trustmesh-agent" as a binary of its own.
func NewCommand(use string) *cobra.Command {
	var (
		cfg      agent.Config
		keyTypes []string
		validate bool
	)
	for _, kt := range svid.KeyTypes {
		keyTypes = append(keyTypes, string(kt))
	}
	cmd := &cobra.Command{
		Use:   use,
		Short: "Run the workload agent: SPIFFE Workload API and Envoy SDS with automatic rotation",
		Long: `Run the workload agent beside a workload. It keeps the private key local,
obtains and renews the workload's X.509-SVID from the trustmesh CA, follows the
CA's trust bundle, and serves the SPIFFE Workload API and Envoy SDS on a unix
socket.

A join token is read from --join-token-file or from the ` + agent.JoinTokenEnv + `
environment variable, never from the command line.

In an injected pod, ` + probe.EnvVar + ` holds the pod's original HTTP, TCP
and gRPC probes; the agent runs them against the application on localhost and
answers the kubelet on --listen-monitoring under /app-health/.

trustmesh agent and trustmesh-agent are the same command; trustmesh-agent is
the agent alone, a fraction of trustmesh's size, and what injected pods run.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.JoinToken = os.Getenv(agent.JoinTokenEnv)
			cfg.AppProbers = os.Getenv(probe.EnvVar)
			if validate {
				if err := agent.Validate(cfg); err != nil {
					return err
				}
				_, err := fmt.Fprintln(cmd.OutOrStdout(), "configuration is valid")
				return err
			}
			cfg.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			return agent.Run(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.CAAddress, "ca-address", "", "the CA's host:port")
	f.StringVar(&cfg.CAServerName, "ca-server-name", "", "name the CA's serving certificate must carry (default: the host of --ca-address)")
	f.StringVar(&cfg.CABundleFile, "ca-bundle", "", "PEM roots to trust the CA with until its bundle stream takes over")
	f.StringVar(&cfg.TokenFile, "token-file", "", "projected service-account token with the CA's audience (default "+agent.DefaultTokenFile+")")
	f.StringVar(&cfg.JoinTokenFile, "join-token-file", "", "file holding a one-time join token")
	f.StringVar(&cfg.SPIFFEID, "spiffe-id", "", "the only SPIFFE ID to accept (default: the one the CA issues first)")
	f.StringVar(&cfg.KeyType, "key-type", string(svid.ECP256), "private key type: "+strings.Join(keyTypes, ", "))
	f.DurationVar(&cfg.CertTTL, "cert-ttl", 0, "certificate lifetime to ask for (default: the CA's)")
	f.StringVar(&cfg.SocketPath, "socket", agent.DefaultSocketPath, "unix socket for the Workload API and SDS")
	f.StringVar(&cfg.SocketGroup, "socket-group", "", "group, by name or number, also allowed to connect (default: owner only)")
	f.StringVar(&cfg.StateDir, "state-dir", "", "owner-only directory to keep the key and certificate across restarts (off Kubernetes)")
	f.StringVar(&cfg.CertDir, "cert-dir", "", "directory to write cert-chain.pem, key.pem and root-cert.pem to")
	f.StringVar(&cfg.MonitoringAddress, "listen-monitoring", "127.0.0.1:15024", "address for /healthz, /metrics and /app-health/; empty disables")
	f.BoolVar(&validate, "validate", false, "check the configuration and exit")
	_ = cmd.MarkFlagRequired("ca-address")
	_ = cmd.MarkFlagRequired("ca-bundle")
	cmd.MarkFlagsMutuallyExclusive("token-file", "join-token-file")
	return cmd
}
