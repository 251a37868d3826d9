package main

import (
	"fmt"
	"log/slog"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/agent"
	"github.com/trustmesh/trustmesh/agent/node"
	"github.com/trustmesh/trustmesh/agent/svid"
)

// newNodeCmd is the node agent: flags to node.Config, nothing more.
func newNodeCmd() *cobra.Command {
	var (
		cfg      node.Config
		keyTypes []string
		validate bool
	)
	for _, kt := range svid.KeyTypes {
		keyTypes = append(keyTypes, string(kt))
	}
	cmd := &cobra.Command{
		Use:   "node",
		Short: "Run the node agent (ambient mode): the identities of every workload on this node, on one attested socket",
		Long: `Run the node agent, one per node. It authenticates to the CA as the node,
asks which identities the node may hold (the CA computes them from the mesh
model: the pods scheduled on the node, or the mesh files' Node), keeps each
workload's private key in memory only, obtains and renews the certificates
in batches (one call per 500), and serves the SPIFFE Workload API and Envoy
SDS on one unix socket to every local process: each caller is attested (its
pod UID from its cgroup, or its uid, gid, executable and network namespace)
and receives the identities whose selectors it matches, and nothing else.

On Kubernetes the node authenticates with its own projected service-account
token (--token-file, audience ` + node.DefaultTokenAudience + `), which the CA must trust
(trustmesh serve --trusted-node-accounts). Off Kubernetes it authenticates
with its node SVID, spiffe://TD/node/NAME, obtained once with a join token
made by 'trustmesh ca token create --node NAME' and kept in --state-dir.
A join token is read from --join-token-file or the ` + agent.JoinTokenEnv + `
environment variable; --join-token puts it where other processes can read
it.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if cfg.JoinToken == "" {
				cfg.JoinToken = os.Getenv(agent.JoinTokenEnv)
			}
			if validate {
				if err := node.Validate(cfg); err != nil {
					return err
				}
				_, err := fmt.Fprintln(cmd.OutOrStdout(), "configuration is valid")
				return err
			}
			cfg.Logger = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			return node.Run(cmd.Context(), cfg)
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.NodeName, "node-name", "", "this node's name (on Kubernetes: spec.nodeName, from the downward API)")
	f.StringVar(&cfg.CAAddress, "ca-address", "", "the CA's host:port")
	f.StringVar(&cfg.CAServerName, "ca-server-name", "", "name the CA's serving certificate must carry (default: the host of --ca-address)")
	f.StringVar(&cfg.CABundleFile, "ca-bundle-file", "", "PEM roots to trust the CA with until its bundle stream takes over")
	f.StringVar(&cfg.TokenFile, "token-file", "", "Kubernetes: the node agent's projected service-account token, audience "+node.DefaultTokenAudience+", re-read at every call")
	f.StringVar(&cfg.JoinTokenFile, "join-token-file", "", "off Kubernetes: file holding a join token for spiffe://TD/node/NAME")
	f.StringVar(&cfg.JoinToken, "join-token", "", "off Kubernetes: a join token for spiffe://TD/node/NAME (prefer --join-token-file or "+agent.JoinTokenEnv+")")
	f.StringVar(&cfg.StateDir, "state-dir", "", "off Kubernetes: owner-only directory keeping the node's own SVID across restarts (workload keys stay in memory)")
	f.StringVar(&cfg.SocketPath, "socket", node.DefaultSocketPath, "unix socket for the Workload API and SDS, open to every local user; attestation decides")
	f.StringVar(&cfg.KeyType, "key-type", string(svid.ECP256), "private key type: "+strings.Join(keyTypes, ", "))
	f.DurationVar(&cfg.CertTTL, "cert-ttl", 0, "certificate lifetime to ask for (default: the CA's)")
	f.DurationVar(&cfg.SyncInterval, "sync-interval", node.DefaultSyncInterval, "how often to fetch the node's entries from the CA")
	f.DurationVar(&cfg.PendingWait, "pending-wait", node.DefaultPendingWait, "how long a caller that matches no entry yet (a pod just started) is waited for")
	f.StringVar(&cfg.Attest.ProcRoot, "proc-root", "/proc", "procfs of the PID namespace callers' PIDs are in (on Kubernetes the node agent runs with hostPID)")
	f.StringVar(&cfg.Attest.NetnsDir, "netns-dir", "/run/netns", "where named network namespaces (netns: selectors) are")
	f.StringVar(&cfg.Attest.KubeletCgroupRoot, "kubelet-cgroup-root", "", "the kubelet's --cgroup-root when not the default (kind: /kubelet); only cgroups under kubepods at the top or there are pods'")
	f.StringVar(&cfg.MonitoringAddress, "monitoring-address", "", "address for /healthz and /metrics; empty disables")
	f.BoolVar(&cfg.Proxy, "proxy", false, "run the L4 proxy of ambient mode: capture the node's ambient pods and carry their TCP over HBONE (needs root: NET_ADMIN, SYS_ADMIN)")
	f.StringVar(&cfg.XDSAddress, "xds-address", "", "with --proxy: host:port of the xDS server the proxy takes workloads and the policy revision from (default: --ca-address)")
	f.StringVar(&cfg.XDSServerName, "xds-server-name", "", "name the xDS server's certificate must carry (default: --ca-server-name with the CA's address, else the host of --xds-address)")
	f.StringVar(&cfg.AuthzAddress, "authz-address", "", "with --proxy: host:port of the control plane's ext_authz, asked about every inbound connection (required with --proxy)")
	f.StringVar(&cfg.AuthzServerName, "authz-server-name", "", "name the ext_authz server's certificate must carry (default: --ca-server-name, else the host of --authz-address)")
	f.StringVar(&cfg.NodeIP, "node-ip", "", "with --proxy: this node's IP, part of the proxy's xDS node id (required with --proxy; on Kubernetes: status.hostIP)")
	f.BoolVar(&validate, "validate", false, "check the configuration and exit")
	_ = cmd.MarkFlagRequired("node-name")
	_ = cmd.MarkFlagRequired("ca-address")
	_ = cmd.MarkFlagRequired("ca-bundle-file")
	cmd.MarkFlagsMutuallyExclusive("token-file", "join-token-file", "join-token")
	return cmd
}
