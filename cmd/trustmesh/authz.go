package main

import (
	"io"
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/connlimit"
)

func newAuthzCmd() *cobra.Command {
	var (
		c           controlplane.StandaloneAuthzConfig
		decisionLog string
		bundles     bundleFlags
	)
	cmd := &cobra.Command{
		Use:   "authz",
		Short: "Serve the Envoy ext_authz service alone",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var err error
			if c.Bundles, err = bundles.configs(c.PolicyDir); err != nil {
				return &exitError{code: 2, err: err}
			}
			c.Log = slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			tracing, err := controlplane.StartTracing(cmd.Context(), os.LookupEnv, cmd.ErrOrStderr())
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			defer tracing.Stop(c.Log)
			c.TracerProvider = tracing.Provider
			dlog, closeLog, err := openDecisionLog(cmd, decisionLog)
			if err != nil {
				return err
			}
			defer closeLog()
			c.DecisionLog = dlog
			return controlplane.RunAuthz(cmd.Context(), c)
		},
	}
	f := cmd.Flags()
	// Loopback, as serve's listeners: other hosts are let in by a flag.
	f.StringVar(&c.Address, "listen", controlplane.DefaultListenAuthz, `address to serve on: "host:port" or "unix:///path"`)
	f.StringVar(&c.Monitoring, "listen-monitoring", "", `address ("host:port") for /healthz, /readyz and /metrics (the decision log's lines written and dropped among them); "" serves none`)
	f.StringVar(&c.PolicyDir, "policies", "", "directory of AuthorizationPolicy YAML files (watched)")
	f.StringVar(&c.RootNamespace, "root-namespace", engine.DefaultRootNamespace, "namespace whose policies apply mesh-wide")
	f.StringVar(&c.TLSCert, "tls-cert", "", "server certificate (PEM)")
	f.StringVar(&c.TLSKey, "tls-key", "", "server private key (PEM)")
	f.StringVar(&c.ClientCA, "client-ca", "", "CA bundle that client certificates must chain to (PEM)")
	f.BoolVar(&c.InsecurePlaintext, "insecure-plaintext", false, "serve plaintext on TCP (local testing only)")
	f.BoolVar(&c.FailOpen, "fail-open", false, "allow requests whose evaluation failed (default: deny with 403)")
	f.StringVar(&decisionLog, "decision-log", "-", `decision log file, "-" for stdout, "" to disable`)
	f.StringSliceVar(&c.HeaderAllowlist, "log-header-allowlist", decisionlog.DefaultHeaderAllowlist, "headers whose values the decision log keeps")
	f.StringSliceVar(&c.QueryAllowlist, "log-query-allowlist", nil, "query parameters whose values the decision log keeps")
	f.StringArrayVar(&c.RedactPaths, "log-redact-path", nil, "regular expression whose matches in request paths (its groups, if it has any) the decision log replaces with REDACTED (repeatable)")
	f.IntVar(&c.MaxConnections, "max-connections", connlimit.DefaultMaxConnections, "connections the listener serves at once; more wait until one closes")
	f.DurationVar(&c.EvalTimeout, "eval-timeout", engine.DefaultEvalTimeout, "time limit of each Rego bundle evaluation; running out denies")
	f.BoolVar(&c.Kubernetes, "kubernetes", false, "watch AuthorizationPolicies in Kubernetes (bundles must then be signed)")
	f.StringVar(&c.Kubeconfig, "kubeconfig", "", "kubeconfig file; empty uses the pod's service account")
	f.StringVar(&c.WatchNamespace, "watch-namespace", "", "watch one namespace only; root-namespace policies outside it are then not seen")
	f.StringVar(&c.MeshDir, "mesh", "", "directory of mesh YAML whose gateway identities remote.ip trusts (watched); without it no peer is a gateway")
	f.BoolVar(&c.V1beta1, "v1beta1", false, "watch security.istio.io/v1beta1 for Istio CRDs that predate v1")
	bundles.register(cmd)
	return cmd
}

// openDecisionLog opens the --decision-log flag's destination: a file
// (appended to, owner-only), "-" for the command's output, "" for none.
func openDecisionLog(cmd *cobra.Command, path string) (io.Writer, func(), error) {
	switch path {
	case "":
		return nil, func() {}, nil
	case "-":
		return cmd.OutOrStdout(), func() {}, nil
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
	if err != nil {
		return nil, nil, err
	}
	return f, func() { _ = f.Close() }, nil
}
