package main

import (
	"io"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/credentials"

	"github.com/trustmesh/trustmesh/authz/authzd"
	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/extauthz"
	"github.com/trustmesh/trustmesh/authz/source/kube"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/mesh"
)

func newAuthzCmd() *cobra.Command {
	var (
		addr, dir, root                 string
		certFile, keyFile, clientCAFile string
		insecurePlaintext, failOpen     bool
		decisionLog                     string
		headerAllow, queryAllow         []string
		redactPaths                     []string
		maxConns                        int
		evalTimeout                     time.Duration
		bundles                         bundleFlags
		onKube                          bool
		kubeconfig, watchNamespace      string
		meshDir                         string
		v1beta1                         bool
	)
	cmd := &cobra.Command{
		Use:   "authz",
		Short: "Serve the Envoy ext_authz service alone",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			bs, err := bundles.configs()
			if err != nil {
				return err
			}
			cfg := authzd.Config{
				Address: addr, InsecurePlaintext: insecurePlaintext, FailOpen: failOpen,
				PolicyDir: dir, Bundles: bs, RootNamespace: root, EvalTimeout: evalTimeout,
				HeaderAllowlist: headerAllow, QueryAllowlist: queryAllow, RedactPaths: redactPaths,
				Connections:  connlimit.Config{MaxConnections: maxConns},
				Log:          slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil)),
				OnKubernetes: onKube || os.Getenv("KUBERNETES_SERVICE_HOST") != "",
			}
			if onKube {
				client, err := kube.NewClient(kubeconfig)
				if err != nil {
					return err
				}
				cfg.Policies = &kube.Source{Client: client, Namespace: watchNamespace, V1beta1: v1beta1}
			}
			if certFile != "" || keyFile != "" || clientCAFile != "" {
				tc, err := authzd.ServerTLS(certFile, keyFile, clientCAFile)
				if err != nil {
					return err
				}
				cfg.Creds = credentials.NewTLS(tc)
			}
			switch decisionLog {
			case "":
			case "-":
				cfg.DecisionLog = cmd.OutOrStdout()
			default:
				f, err := os.OpenFile(decisionLog, os.O_CREATE|os.O_APPEND|os.O_WRONLY, 0o600)
				if err != nil {
					return err
				}
				defer f.Close()
				cfg.DecisionLog = io.Writer(f)
			}
			if meshDir != "" {
				cfg.Mesh = &mesh.Dir{Path: meshDir}
			}
			svc, err := authzd.New(cfg)
			if err != nil {
				return err
			}
			return svc.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&addr, "listen", extauthz.DefaultAddress, `address to serve on: "host:port" or "unix:///path"`)
	f.StringVar(&dir, "policies", "", "directory of AuthorizationPolicy YAML files (watched)")
	f.StringVar(&root, "root-namespace", engine.DefaultRootNamespace, "namespace whose policies apply mesh-wide")
	f.StringVar(&certFile, "tls-cert", "", "server certificate (PEM)")
	f.StringVar(&keyFile, "tls-key", "", "server private key (PEM)")
	f.StringVar(&clientCAFile, "client-ca", "", "CA bundle that client certificates must chain to (PEM)")
	f.BoolVar(&insecurePlaintext, "insecure-plaintext", false, "serve plaintext on TCP (local testing only)")
	f.BoolVar(&failOpen, "fail-open", false, "allow requests whose evaluation failed (default: deny with 403)")
	f.StringVar(&decisionLog, "decision-log", "-", `decision log file, "-" for stdout, "" to disable`)
	f.StringSliceVar(&headerAllow, "log-header-allowlist", decisionlog.DefaultHeaderAllowlist, "headers whose values the decision log keeps")
	f.StringSliceVar(&queryAllow, "log-query-allowlist", nil, "query parameters whose values the decision log keeps")
	f.StringArrayVar(&redactPaths, "log-redact-path", nil, "regular expression whose matches in request paths (its groups, if it has any) the decision log replaces with REDACTED (repeatable)")
	f.IntVar(&maxConns, "max-connections", connlimit.DefaultMaxConnections, "connections the listener serves at once; more wait until one closes")
	f.DurationVar(&evalTimeout, "eval-timeout", engine.DefaultEvalTimeout, "time limit of each Rego bundle evaluation; running out denies")
	f.BoolVar(&onKube, "kubernetes", false, "watch AuthorizationPolicies in Kubernetes (bundles must then be signed)")
	f.StringVar(&kubeconfig, "kubeconfig", "", "kubeconfig file; empty uses the pod's service account")
	f.StringVar(&watchNamespace, "watch-namespace", "", "watch one namespace only; root-namespace policies outside it are then not seen")
	f.StringVar(&meshDir, "mesh", "", "directory of mesh YAML whose gateway identities remote.ip trusts (watched); without it no peer is a gateway")
	f.BoolVar(&v1beta1, "v1beta1", false, "watch security.istio.io/v1beta1 for Istio CRDs that predate v1")
	bundles.register(cmd)
	return cmd
}
