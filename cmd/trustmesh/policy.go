package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/inspect"
	"github.com/trustmesh/trustmesh/authz/source"
)

// bundleFlags are the Rego bundle flags shared by `policy` and `authz`.
type bundleFlags struct {
	paths        []string
	regoV0       bool
	keyFile      string
	keyAlgorithm string
	requireSig   bool
}

func (f *bundleFlags) register(cmd *cobra.Command) {
	cmd.Flags().StringArrayVar(&f.paths, "bundle", nil, "Rego bundle directory or .tar.gz (repeatable)")
	cmd.Flags().BoolVar(&f.regoV0, "rego-v0", false, "parse bundles in OPA's v0 syntax unless their manifest says otherwise")
	cmd.Flags().StringVar(&f.keyFile, "bundle-verification-key", "", "PEM public key that bundle signatures must verify against")
	cmd.Flags().StringVar(&f.keyAlgorithm, "bundle-key-algorithm", "RS256", "bundle signing algorithm")
	cmd.Flags().BoolVar(&f.requireSig, "require-signed-bundles", false, "refuse unsigned bundles (always on in Kubernetes)")
}

func (f *bundleFlags) configs() ([]source.BundleConfig, error) {
	var key string
	if f.keyFile != "" {
		b, err := os.ReadFile(f.keyFile)
		if err != nil {
			return nil, err
		}
		key = string(b)
	}
	out := make([]source.BundleConfig, len(f.paths))
	for i, p := range f.paths {
		out[i] = source.BundleConfig{Path: p, RegoV0: f.regoV0, VerificationKey: key, KeyAlgorithm: f.keyAlgorithm, RequireSignature: f.requireSig}
	}
	return out, nil
}

func newPolicyCmd() *cobra.Command {
	cmd := &cobra.Command{
		Use:   "policy",
		Short: "Check and compile AuthorizationPolicies offline",
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
		bs, err := bundles.configs()
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
	for _, c := range []*cobra.Command{check, compile} {
		c.Flags().StringVar(&dir, "policies", "", "directory of AuthorizationPolicy YAML files")
		c.Flags().StringVar(&root, "root-namespace", engine.DefaultRootNamespace, "namespace whose policies apply mesh-wide")
		bundles.register(c)
		// Flag errors are bad input too.
		c.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return &exitError{code: 2, err: err} })
	}
	cmd.AddCommand(check, compile)
	return cmd
}
