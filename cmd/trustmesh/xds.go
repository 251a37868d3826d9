package main

import (
	"errors"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/api/identity"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/controlplane"
)

func newXDSCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "xds", Short: "Inspect the configuration the xDS server gives proxies"}
	var c controlplane.DumpConfig
	dump := &cobra.Command{
		Use:   "dump --node ID --mesh DIR [--policies DIR]",
		Short: "Print a node's xDS resources as JSON, as the control plane computes them",
		Long: `Print the listeners, routes, clusters, endpoints and secrets (private keys
redacted) that the xDS server would send the node with this id
(sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local, or router~... for a
gateway); for a node proxy's id (node~IP~NODE~cluster.local), the workloads
that trustmesh node is sent. It computes them from the mesh and policy files; it does not
connect to a server or pose as the node. Its policy_digest names the
policies it read, as the policy_digest of a control plane's decision log
names the policies in force there.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			out, err := controlplane.DumpXDS(c)
			if ce := (*controlplane.ConfigError)(nil); errors.As(err, &ce) {
				return &exitError{code: 2, err: ce.Err}
			}
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(out)
			return err
		},
	}
	fl := dump.Flags()
	fl.StringVar(&c.MeshDir, "mesh", "", "directory of mesh YAML files (local mode)")
	fl.StringVar(&c.PolicyDir, "policies", "", "directory of AuthorizationPolicy YAML files")
	fl.StringVar(&c.TrustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain")
	fl.StringVar(&c.RootNamespace, "root-namespace", engine.DefaultRootNamespace, "namespace whose policies apply mesh-wide")
	fl.StringVar(&c.AuthzAddress, "authz-address", identity.AuthzAddress(""), "host:port of the ext_authz service, as proxies reach it")
	fl.StringVar(&c.AuthzID, "authz-id", "", "SPIFFE ID of the ext_authz service (default spiffe://TD/ns/trustmesh-system/sa/trustmesh)")
	fl.StringVar(&c.NodeID, "node", "", "node id (required)")
	fl.StringVar(&c.ServiceAccount, "service-account", "", "the node's service account (default: its pod's in the mesh)")
	fl.StringToStringVar(&c.Labels, "labels", nil, "the node's labels (default: its pod's in the mesh)")
	fl.BoolVar(&c.Proxyless, "proxyless", false, "the node is a proxyless grpc-go client (GENERATOR: grpc)")
	_ = dump.MarkFlagRequired("node")
	_ = dump.MarkFlagRequired("mesh")
	cmd.AddCommand(dump)
	return cmd
}
