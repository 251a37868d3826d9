package main

import (
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/authz/access"
	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/inspect"
	"github.com/trustmesh/trustmesh/authz/source"
)

// bundleFlags are the Rego bundle flags shared by `serve`, `policy` and
// `authz`.
type bundleFlags struct{ source.Bundles }

func (f *bundleFlags) register(cmd *cobra.Command) {
	registerBundleFlags(cmd, &f.Bundles)
}

// registerBundleFlags binds the Rego bundle flags to b.
func registerBundleFlags(cmd *cobra.Command, b *source.Bundles) {
	fs := cmd.Flags()
	fs.StringArrayVar(&b.Paths, "bundle", nil, "Rego bundle directory or .tar.gz (repeatable); a --policies directory may also name its bundles in "+source.BundlesFile)
	fs.BoolVar(&b.RegoV0, "rego-v0", false, "parse bundles in OPA's v0 syntax unless their manifest says otherwise")
	fs.StringVar(&b.VerificationKeyFile, "bundle-verification-key", "", "PEM public key (or HMAC secret) that every bundle's .signatures.json must verify against; unsigned bundles are then refused")
	fs.StringVar(&b.KeyID, "bundle-verification-key-id", "", `ID of the verification key, as OPA's --verification-key-id (default "default")`)
	fs.StringVar(&b.KeyAlgorithm, "bundle-key-algorithm", "RS256", "bundle signing algorithm")
	fs.StringVar(&b.Scope, "bundle-verification-scope", "", "scope the bundle signatures must claim, as OPA's --scope")
	fs.BoolVar(&b.RequireSignature, "require-signed-bundles", false, "refuse unsigned bundles (always on in Kubernetes)")
}

// configs resolves the flags, with the bundles policyDir names.
func (f *bundleFlags) configs(policyDir string) ([]source.BundleConfig, error) {
	return f.Bundles.Configs(policyDir)
}

func newPolicyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Check, explain and compile AuthorizationPolicies offline, and show who may call whom",
	}
	var (
		dir         string
		root        string
		request     string
		requests    string
		redactPaths []string
		bundles     bundleFlags
	)
	config := func() (inspect.Config, error) {
		bs, err := bundles.configs(dir)
		if err != nil {
			return inspect.Config{}, &exitError{code: 2, err: err}
		}
		return inspect.Config{PolicyDir: dir, Bundles: bs, RootNamespace: root, RedactPaths: redactPaths}, nil
	}
	exit := func(err error) error {
		if errors.Is(err, inspect.ErrBadInput) {
			return &exitError{code: 2, err: err}
		}
		return err
	}
	check := &cobra.Command{
		Use:   "check --policies DIR (--request FILE | --requests FILE)",
		Short: "Print the decision for CheckRequests (protojson) as the server would make them",
		Long: `Print the decision for one CheckRequest (--request), or for many from one
load of the policies (--requests: JSON lines or one JSON array, "-" for
stdin), one decision per line in the order of the requests.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config()
			if err != nil {
				return err
			}
			if requests != "" {
				in := cmd.InOrStdin()
				if requests != "-" {
					f, err := os.Open(requests)
					if err != nil {
						return &exitError{code: 2, err: fmt.Errorf("requests: %w", err)}
					}
					defer f.Close()
					in = f
				}
				return exit(inspect.CheckBatch(cmd.Context(), cfg, in, cmd.OutOrStdout()))
			}
			req, err := os.ReadFile(request)
			if err != nil {
				return &exitError{code: 2, err: fmt.Errorf("request: %w", err)}
			}
			return exit(inspect.Check(cmd.Context(), cfg, req, cmd.OutOrStdout()))
		},
	}
	check.Flags().StringVar(&request, "request", "", "envoy.service.auth.v3.CheckRequest in protojson")
	check.Flags().StringVar(&requests, "requests", "", `CheckRequests in protojson, as JSON lines or a JSON array; "-" reads stdin`)
	check.Flags().StringArrayVar(&redactPaths, "log-redact-path", nil, "regular expression whose matches (its groups, if it has any) are replaced in paths the decisions quote, as in the decision log (repeatable)")
	check.MarkFlagsOneRequired("request", "requests")
	check.MarkFlagsMutuallyExclusive("request", "requests")
	var (
		output          outputFormat
		headerAllowlist []string
	)
	explain := &cobra.Command{
		Use:   "explain --policies DIR --request FILE",
		Short: "Explain the decision for one CheckRequest (protojson): the policies that applied, each rule's match or miss and why, and the deciding one",
		Long: `Explain the decision for one CheckRequest (protojson, as policy check reads
it): how the policies were selected, every policy that applied in Istio's
order (CUSTOM, DENY, ALLOW; AUDIT never decides; dry-run marked), each
rule's match or miss with its first failing field, the request's value and
the values it wanted, and the deciding policy and rule. The decision is the
one policy check prints. Request values are redacted as in the decision
log: paths by --log-redact-path, header values unless in
--log-header-allowlist.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config()
			if err != nil {
				return err
			}
			if request == "" {
				return &exitError{code: 2, err: errors.New("--request FILE is required")}
			}
			req, err := os.ReadFile(request)
			if err != nil {
				return &exitError{code: 2, err: fmt.Errorf("request: %w", err)}
			}
			ex, err := inspect.Explain(cmd.Context(), inspect.ExplainConfig{Config: cfg, HeaderAllowlist: headerAllowlist}, req)
			if err != nil {
				return exit(err)
			}
			return output.print(cmd.OutOrStdout(), ex, func(w io.Writer) error { return inspect.WriteExplanation(w, ex) })
		},
	}
	explain.Flags().StringVar(&request, "request", "", "envoy.service.auth.v3.CheckRequest in protojson")
	explain.Flags().StringArrayVar(&redactPaths, "log-redact-path", nil, "regular expression whose matches (its groups, if it has any) are replaced in the paths shown, as in the decision log (repeatable)")
	explain.Flags().StringSliceVar(&headerAllowlist, "log-header-allowlist", decisionlog.DefaultHeaderAllowlist, "headers whose values are shown, as in the decision log; other headers show as REDACTED")
	addOutputFlag(explain, &output)
	compile := &cobra.Command{
		Use:   "compile --policies DIR",
		Short: "Print the Rego the AuthorizationPolicies compile to",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config()
			if err != nil {
				return err
			}
			return exit(inspect.Compile(cmd.Context(), cfg, cmd.OutOrStdout()))
		},
	}
	var (
		meshDir, whoTo, whoFrom, trustDomain string
		whoOutput                            outputFormat
	)
	whoCan := &cobra.Command{
		Use:   "who-can --policies DIR --mesh DIR (--to SERVICE[:PORT] | --from SERVICE)",
		Short: "Show who may call a service (and port), or whom a caller may call: allowed, denied, or conditional on the request, with the deciding policy",
		Long: `Show who may call a service (--to namespace/name, optionally :PORT, a port
number or name), or whom a caller may call (--from namespace/name), from the
AuthorizationPolicies over the mesh model: the computation of the UI's access
view. Each caller (a service, or the workloads of one service account that
serve no service) and port is allowed (every request), denied (every
request), or conditional: on the request (path, method, header, host, ...),
on an external authorizer (CUSTOM), or because the caller's identities or the
service's workloads are treated differently. The conditions are listed in
words with the rules that decide. The policies and the mesh are read and
refused as serve reads them. The values the conditions quote are redacted
as the decision log (and the UI's access view) would redact a request's:
paths by --log-redact-path, header values unless in --log-header-allowlist.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg, err := config()
			if err != nil {
				return err
			}
			red, err := decisionlog.NewRedactor(headerAllowlist, nil, redactPaths)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			m, err := access.Load(cmd.Context(), access.LoadConfig{PolicyDir: dir, Bundles: cfg.Bundles, MeshDir: meshDir,
				RootNamespace: root, TrustDomain: trustDomain, Redact: red})
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			a, err := m.WhoCan(whoTo, whoFrom)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			return whoOutput.print(cmd.OutOrStdout(), a, func(w io.Writer) error { return access.WriteAnswer(w, a) })
		},
	}
	whoCan.Flags().StringVar(&meshDir, "mesh", "", "directory of mesh model YAML files, as serve --mesh reads it")
	whoCan.Flags().StringVar(&whoTo, "to", "", "the service called, namespace/name[:PORT]")
	whoCan.Flags().StringVar(&whoFrom, "from", "", "the caller, namespace/name")
	whoCan.Flags().StringVar(&trustDomain, "trust-domain", access.DefaultTrustDomain, "SPIFFE trust domain the mesh's identities belong to")
	whoCan.Flags().StringArrayVar(&redactPaths, "log-redact-path", nil, "regular expression whose matches (its groups, if it has any) are replaced in the paths the conditions quote, as in the decision log (repeatable)")
	whoCan.Flags().StringSliceVar(&headerAllowlist, "log-header-allowlist", decisionlog.DefaultHeaderAllowlist, "headers whose values the conditions quote, as in the decision log; other headers show as REDACTED")
	whoCan.MarkFlagsOneRequired("to", "from")
	whoCan.MarkFlagsMutuallyExclusive("to", "from")
	addOutputFlag(whoCan, &whoOutput)
	for _, c := range []*cobra.Command{check, explain, compile, whoCan} {
		c.Flags().StringVar(&dir, "policies", "", "directory of AuthorizationPolicy YAML files")
		c.Flags().StringVar(&root, "root-namespace", engine.DefaultRootNamespace, "namespace whose policies apply mesh-wide")
		bundles.register(c)
	}
	cmd.AddCommand(check, explain, compile, whoCan)
	return cmd
}
