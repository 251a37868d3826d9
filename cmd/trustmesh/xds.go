package main

import (
	"fmt"
	"net"
	"strconv"

	"github.com/spf13/cobra"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/api/identity"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// xdsFlags are the flags that shape generated resources, shared by the
// commands that compute them.
type xdsFlags struct {
	meshDir, policiesDir string
	trustDomain, root    string
	authzAddress         string
	authzID              string
}

func (f *xdsFlags) register(cmd *cobra.Command) {
	fl := cmd.Flags()
	fl.StringVar(&f.meshDir, "mesh", "", "directory of mesh YAML files (local mode)")
	fl.StringVar(&f.policiesDir, "policies", "", "directory of AuthorizationPolicy YAML files")
	fl.StringVar(&f.trustDomain, "trust-domain", "cluster.local", "SPIFFE trust domain")
	fl.StringVar(&f.root, "root-namespace", engine.DefaultRootNamespace, "namespace whose policies apply mesh-wide")
	fl.StringVar(&f.authzAddress, "authz-address", identity.AuthzAddress(""), "host:port of the ext_authz service, as proxies reach it")
	fl.StringVar(&f.authzID, "authz-id", "", "SPIFFE ID of the ext_authz service (default spiffe://TD/ns/trustmesh-system/sa/trustmesh)")
}

func (f *xdsFlags) proxy() (proxyconfig.Config, error) {
	td, err := spiffeid.TrustDomainFromString(f.trustDomain)
	if err != nil {
		return proxyconfig.Config{}, fmt.Errorf("--trust-domain: %w", err)
	}
	host, portStr, err := net.SplitHostPort(f.authzAddress)
	if err != nil {
		return proxyconfig.Config{}, fmt.Errorf("--authz-address: %w", err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return proxyconfig.Config{}, fmt.Errorf("--authz-address: %w", err)
	}
	idStr := f.authzID
	if idStr == "" {
		idStr = identity.ID(td.Name(), "")
	}
	id, err := spiffeid.FromString(idStr)
	if err != nil {
		return proxyconfig.Config{}, fmt.Errorf("--authz-id: %w", err)
	}
	return proxyconfig.Config{TrustDomain: td, RootNamespace: f.root, AuthzHost: host, AuthzPort: uint32(port), AuthzID: id}, nil
}

func newXDSCmd() *cobra.Command {
	cmd := &cobra.Command{Use: "xds", Short: "Inspect the configuration the xDS server gives proxies"}
	var (
		f         xdsFlags
		node, sa  string
		labels    map[string]string
		proxyless bool
	)
	dump := &cobra.Command{
		Use:   "dump --node ID --mesh DIR [--policies DIR]",
		Short: "Print a node's xDS resources as JSON, as the control plane computes them",
		Long: `Print the listeners, routes, clusters, endpoints and secrets (private keys
redacted) that the xDS server would send the node with this id
(sidecar~IP~POD.NAMESPACE~NAMESPACE.svc.cluster.local, or router~... for a
gateway). It computes them from the mesh and policy files; it does not
connect to a server or pose as the node. Its policy_digest names the
policies it read, as the policy_digest of a control plane's decision log
names the policies in force there.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := f.proxy()
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			req := xds.DumpRequest{
				Mesh: &mesh.Dir{Path: f.meshDir}, Proxy: cfg,
				NodeID: node, ServiceAccount: sa, Labels: labels, Proxyless: proxyless,
			}
			if f.policiesDir != "" {
				req.Policies = &source.Dir{Path: f.policiesDir, DefaultNamespace: "default"}
			}
			out, err := xds.Dump(req)
			if err != nil {
				return err
			}
			_, err = cmd.OutOrStdout().Write(out)
			return err
		},
	}
	f.register(dump)
	dump.Flags().StringVar(&node, "node", "", "node id (required)")
	dump.Flags().StringVar(&sa, "service-account", "", "the node's service account (default: its pod's in the mesh)")
	dump.Flags().StringToStringVar(&labels, "labels", nil, "the node's labels (default: its pod's in the mesh)")
	dump.Flags().BoolVar(&proxyless, "proxyless", false, "the node is a proxyless grpc-go client (GENERATOR: grpc)")
	_ = dump.MarkFlagRequired("node")
	_ = dump.MarkFlagRequired("mesh")
	cmd.AddCommand(dump)
	return cmd
}
