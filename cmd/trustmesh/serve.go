package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"github.com/spf13/cobra"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

func newServeCmd() *cobra.Command {
	var cfg controlplane.Config
	var validate, debugEndpoints, injection, failClosed bool
	var logFormat, logLevel, decisionLog string
	cmd := &cobra.Command{
		Use:   "serve",
		Short: "Run the control plane: the CA, xDS, ext_authz, the injector, health and metrics",
		Long: fmt.Sprintf(`Run the trustmesh control plane, each part on its own listener:

  --listen-ca         %-16s the CA (gRPC over TLS), and xDS for proxies
  --listen-authz      %-16s ext_authz (gRPC over mTLS), with --policies or on Kubernetes
  --listen-monitoring %-16s /healthz, /readyz and /metrics; /debug/xds/clients with --debug-endpoints
  --listen-bundle     %-16s the SPIFFE bundle endpoint (HTTPS), for federation
  --listen-injector   %-16s the sidecar-injection webhook (/inject) and the
                                       validating webhook (/validate), on Kubernetes
  --listen-ui         %-16s the web UI (/ui/): identities, CA, access, denials,
                                       journal; off loopback only with --ui-token-file
                                       (and TLS, or --ui-insecure-http) or with
                                       --ui-client-ca and --ui-client-id

Every listener is on loopback unless told otherwise; the Helm chart sets the
addresses a pod listens on. xDS serves the --mesh directory or, on
Kubernetes, the cluster. CA material and the journal live in --data-dir,
created on first start and held by one serve at a time; operator commands
(trustmesh ca, trustmesh audit) work beside it. Kubernetes is used only when
running in a cluster or given --kubeconfig. --validate checks what a start
checks, short of serving: the configuration, every file and key it names,
that every port is free, and that the data dir is a directory no running
serve holds, of this trust domain. It reports every problem and writes
nothing. A start that fails leaves no data dir it created behind.`,
			controlplane.DefaultListenCA, controlplane.DefaultListenAuthz, controlplane.DefaultListenMonitoring,
			controlplane.DefaultListenBundle, controlplane.DefaultListenInjector, controlplane.DefaultListenUI),
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			log, err := newLogger(logFormat, logLevel)
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			cfg.Log = log
			cfg.Listen.NoDebugEndpoints = !debugEndpoints
			cfg.Injector.Disabled = !injection
			cfg.Admission.KeepIgnore = !failClosed
			if validate {
				err := errors.Join(controlplane.Check(cmd.Context(), cfg), checkDecisionLog(decisionLog), controlplane.CheckTracing(os.LookupEnv))
				if err != nil {
					return &exitError{code: 2, err: err}
				}
				_, err = fmt.Fprintln(cmd.OutOrStdout(), "configuration is valid")
				return err
			}
			// Tracing from the OTEL_* environment, before anything is
			// written: a variable it cannot honour is a usage error.
			tracing, err := controlplane.StartTracing(cmd.Context(), os.LookupEnv, cmd.ErrOrStderr())
			if err != nil {
				return &exitError{code: 2, err: err}
			}
			defer tracing.Stop(log)
			cfg.TracerProvider = tracing.Provider
			dlog, closeLog, undo, err := createDecisionLog(cmd, decisionLog)
			if err != nil {
				return err
			}
			defer closeLog()
			cfg.Authz.DecisionLog = dlog
			cp, err := controlplane.New(cmd.Context(), cfg)
			if err != nil {
				undo()
				return err
			}
			return cp.Run(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.DataDir, "data-dir", controlplane.DefaultDataDir, "directory for CA material and the journal")
	f.StringVar(&cfg.TrustDomain, "trust-domain", controlplane.DefaultTrustDomain, "SPIFFE trust domain")
	f.StringVar(&cfg.Listen.CA, "listen-ca", controlplane.DefaultListenCA, "address of the CA's gRPC port")
	f.StringVar(&cfg.Listen.Monitoring, "listen-monitoring", controlplane.DefaultListenMonitoring, "address for /healthz, /readyz, /metrics and the debug endpoints")
	f.BoolVar(&debugEndpoints, "debug-endpoints", true, "serve /debug/xds/clients (every connected proxy's name, address and SPIFFE ID) on --listen-monitoring; turn off where others can reach that address")
	f.StringVar(&cfg.Listen.Bundle, "listen-bundle", controlplane.DefaultListenBundle, "address of the SPIFFE bundle endpoint (HTTPS); empty turns it off")
	f.StringSliceVar(&cfg.CA.DNSNames, "ca-dns-names", controlplane.DefaultCADNSNames, "DNS names and IPs in the CA's serving certificate")
	f.StringVar(&cfg.Journal.DSN, "journal-dsn", "", "PostgreSQL URL of the journal, shared by replicas (default: SQLite in --data-dir)")
	f.StringVar(&cfg.Journal.CheckpointKeyURI, "checkpoint-key-uri", "", "KMS URI of the journal's Ed25519 checkpoint key (default: a key file in --data-dir)")
	f.StringVar(&cfg.Journal.Witness, "witness", "", "file outside --data-dir, or http(s) URL of a C2SP tlog-witness, that receives every signed journal checkpoint")
	f.StringVar(&cfg.Journal.WitnessKey, "witness-key", "", "the tlog-witness's cosignature/v1 verifier key: its cosignatures are verified and the latest kept in --data-dir/witness-cosigned.checkpoint")
	f.StringVar(&cfg.Listen.Authz, "listen-authz", controlplane.DefaultListenAuthz, `ext_authz gRPC address (mTLS), "unix:///path", or "off"`)
	f.StringVar(&cfg.Authz.PolicyDir, "policies", "", "directory of AuthorizationPolicy YAML files, watched (off Kubernetes)")
	f.StringVar(&cfg.Authz.RootNamespace, "root-namespace", "istio-system", "namespace whose AuthorizationPolicies apply mesh-wide")
	f.StringVar(&decisionLog, "decision-log", "-", `authz decision log: a file, "-" for stdout, "" to turn it off`)
	f.StringArrayVar(&cfg.Authz.LogRedactPaths, "log-redact-path", nil, "regular expression whose matches in request paths (its groups, if it has any) the decision log replaces with REDACTED (repeatable)")
	registerBundleFlags(cmd, &cfg.Authz.Bundles)
	f.IntVar(&cfg.Listen.Connections.MaxConnections, "max-connections", connlimit.DefaultMaxConnections, "connections each listener serves at once; more wait until one closes")
	f.DurationVar(&cfg.Listen.Connections.IdleTimeout, "idle-timeout", connlimit.DefaultIdleTimeout, "close a connection with no HTTP request or gRPC call in flight for this long, on every listener")
	f.StringVar(&cfg.XDS.MeshDir, "mesh", "", "directory of mesh YAML (services, endpoints, gateways), watched; the xDS server on the CA port serves proxies from it (off Kubernetes)")
	f.StringVar(&cfg.XDS.AuthzAddress, "authz-address", "", "host:port of the ext_authz service as proxies reach it (default trustmesh.trustmesh-system.svc:9191)")
	f.IntVar(&cfg.XDS.MaxStreamsPerIdentity, "xds-max-streams-per-identity", xds.DefaultMaxStreamsPerIdentity, "xDS streams one SPIFFE ID may hold open, per pod the mesh lists under it")
	f.IntVar(&cfg.XDS.MaxNodesPerIdentity, "xds-max-nodes-per-identity", xds.DefaultMaxNodesPerIdentity, "xDS node ids one SPIFFE ID may register, per pod the mesh lists under it")
	f.DurationVar(&cfg.XDS.FirstPushHold, "xds-first-push-hold", xds.DefaultFirstPushHold, "how long a proxy may hold a first-configuration slot without acknowledging")
	f.Uint32Var(&cfg.XDS.GatewayTrustedHops, "gateway-trusted-hops", 0, "proxies in front of the gateways that append to X-Forwarded-For (their xff_num_trusted_hops)")
	f.StringVar(&cfg.XDS.Tracing.Collector, "tracing-collector", "", "host:port of the OpenTelemetry collector (OTLP/gRPC) the proxies export spans to; a mesh service is reached over mesh mTLS; empty gives proxies no tracer")
	f.Float64Var(&cfg.XDS.Tracing.SamplingPercent, "tracing-sampling", proxyconfig.DefaultTracingSampling, "percent of requests (0 to 100) a proxy starts a trace for, with --tracing-collector")
	f.StringVar(&cfg.Listen.Injector, "listen-injector", controlplane.DefaultListenInjector, `admission webhooks' address (sidecar injection and config validation), on Kubernetes; "off" turns both off`)
	f.StringVar(&cfg.Listen.UI, "listen-ui", controlplane.DefaultListenUI, `address of the web UI (/ui/); "off" turns it off; off loopback it needs --ui-token-file or --ui-client-ca`)
	f.StringArrayVar(&cfg.UI.AllowedHosts, "ui-allowed-host", nil, "further Host name (NAME or NAME:PORT) the web UI answers to, besides loopback's and its listen address (repeatable)")
	f.StringVar(&cfg.UI.TokenFile, "ui-token-file", "", "file holding the web UI's bearer token (16 characters or more), sent as Authorization: Bearer or exchanged at /ui/login for a session cookie")
	f.StringVar(&cfg.UI.TLSCert, "ui-tls-cert", "", "certificate (PEM) to serve the web UI over HTTPS, with --ui-tls-key")
	f.StringVar(&cfg.UI.TLSKey, "ui-tls-key", "", "private key (PEM) of --ui-tls-cert")
	f.StringVar(&cfg.UI.ClientCA, "ui-client-ca", "", "CA bundle (PEM) the web UI's clients must present a certificate from (mTLS; needs --ui-tls-cert and --ui-client-id)")
	f.StringArrayVar(&cfg.UI.ClientIDs, "ui-client-id", nil, "SPIFFE ID (URI SAN) of a client certificate let into the web UI (repeatable; required with --ui-client-ca, since with the mesh's bundle every workload has a certificate from it)")
	f.BoolVar(&cfg.UI.InsecureHTTP, "ui-insecure-http", false, "allow --ui-token-file off loopback without --ui-tls-cert: the token and the session cookie then cross the network in clear")
	f.BoolVar(&injection, "injection", true, "serve sidecar injection on --listen-injector; false still serves config validation there")
	f.StringVar(&cfg.Admission.WebhookConfig, "validation-webhook-config", controlplane.DefaultValidationWebhook, `ValidatingWebhookConfiguration whose caBundle serve keeps current, and whose failurePolicy it switches from Ignore to Fail once the webhook answers; "off" keeps none`)
	f.BoolVar(&failClosed, "validation-fail-closed", true, "switch the validating webhook's failurePolicy to Fail once it answers; false keeps Ignore (for a single replica, whose absence would block every write of the kinds it checks)")
	f.StringVar(&cfg.Injector.MeshConfig, "mesh-config", "", "mesh config file for injection (images, ports, resources, exclusion limits)")
	f.StringVar(&cfg.Injector.WebhookConfig, "injector-webhook-config", controlplane.DefaultInjectorWebhook, "MutatingWebhookConfiguration whose caBundle serve keeps current")
	f.StringVar(&cfg.CA.CertsDir, "cacerts", "", "operator-supplied CA in Istio's cacerts layout (ca-cert.pem, ca-key.pem, cert-chain.pem, root-cert.pem)")
	f.StringVar(&cfg.CA.KeyURI, "ca-key-uri", "", "KMS URI of the CA signing key, instead of ca-key.pem (needs --cacerts)")
	f.StringVar(&cfg.Kubernetes.Mode, "kubernetes", controlplane.KubernetesAuto, "Kubernetes integration: auto, on or off")
	f.StringVar(&cfg.Kubernetes.Kubeconfig, "kubeconfig", "", "kubeconfig file; in a cluster the pod's service account is used")
	f.StringVar(&cfg.CA.TokenAudience, "token-audience", "istio-ca", "audience service-account tokens must carry")
	f.DurationVar(&cfg.CA.MinWorkloadTTL, "min-workload-ttl", 0, "shortest workload certificate lifetime (default 5m)")
	f.DurationVar(&cfg.CA.MaxWorkloadTTL, "max-workload-ttl", 0, "longest workload certificate lifetime (default 24h)")
	f.DurationVar(&cfg.CA.DefaultWorkloadTTL, "default-workload-ttl", 0, "lifetime when none is asked for (default 1h)")
	f.DurationVar(&cfg.CA.MaxEnrolmentAge, "max-enrolment-age", 0, "how long a join-token enrolment may renew (default 720h)")
	f.DurationVar(&cfg.CA.KubeStaleCacheLimit, "kube-stale-cache-limit", 0, "on Kubernetes: how long renewal re-checks service accounts against a cache that has stopped hearing from the apiserver, before it refuses them as unavailable (default 5m)")
	f.DurationVar(&cfg.CA.MaxClockSkew, "ca-max-clock-skew", 0, "how far the CA's clock may be behind its journal's newest issuance before it stops signing (default 5m)")
	f.StringVar(&cfg.CA.Secret, "ca-secret", "", "on Kubernetes: namespace/name of the Secret that holds the self-managed CA for every replica")
	f.StringSliceVar(&cfg.CA.TrustedNodeAccounts, "trusted-node-accounts", nil, "on Kubernetes: namespace/serviceaccount,... of node agents (trustmesh node) trusted for delegated issuance of the identities of the pods on their node (default none)")
	f.DurationVar(&cfg.Rotation.IntermediateTTL, "ca-intermediate-ttl", 0, "lifetime of self-managed intermediates (default 8760h)")
	f.BoolVar(&cfg.Rotation.Manual, "manual-ca-rotation", false, "do not rotate self-managed CA certificates automatically")
	f.DurationVar(&cfg.Rotation.Interval, "ca-rotation-interval", 0, "how often the CA checks its rotation state, taking due steps and picking up trustmesh ca rotate (default 1m)")
	f.DurationVar(&cfg.Rotation.RootPropagation, "ca-root-propagation", 0, "how long a new self-managed root is in every agent's trust bundle before it signs (default 24h)")
	f.BoolVar(&validate, "validate", false, "check the configuration, the files and keys it names, the ports and the data dir as a start would, write nothing, and exit")
	f.StringVar(&logFormat, "log-format", "text", "log format: text or json")
	f.StringVar(&logLevel, "log-level", "info", "log level: debug, info, warn or error")
	return cmd
}

func newLogger(format, level string) (*slog.Logger, error) {
	var lvl slog.Level
	if err := lvl.UnmarshalText([]byte(level)); err != nil {
		return nil, fmt.Errorf("log level %q: %w", level, err)
	}
	opts := &slog.HandlerOptions{Level: lvl}
	switch strings.ToLower(format) {
	case "text":
		return slog.New(slog.NewTextHandler(os.Stderr, opts)), nil
	case "json":
		return slog.New(slog.NewJSONHandler(os.Stderr, opts)), nil
	}
	return nil, fmt.Errorf("log format %q is not text or json", format)
}

// checkDecisionLog is --validate's check of --decision-log: the file can
// be appended to, or created, without creating it.
func checkDecisionLog(path string) error {
	if path == "" || path == "-" {
		return nil
	}
	fi, err := os.Stat(path)
	switch {
	case err == nil && fi.IsDir():
		err = fmt.Errorf("%s is a directory", path)
	case err == nil:
		var f *os.File
		if f, err = os.OpenFile(path, os.O_APPEND|os.O_WRONLY, 0); err == nil {
			_ = f.Close()
		}
	case errors.Is(err, fs.ErrNotExist):
		dir := filepath.Dir(path)
		if fi, err = os.Stat(dir); err == nil && !fi.IsDir() {
			err = fmt.Errorf("%s is not a directory", dir)
		}
		if err == nil {
			if err = syscall.Access(dir, 2 /* W_OK */); err != nil {
				err = fmt.Errorf("cannot create a file in %s: %w", dir, err)
			}
		}
	}
	if err != nil {
		return fmt.Errorf("--decision-log: %w", err)
	}
	return nil
}

// createDecisionLog is openDecisionLog for serve, whose failed start
// leaves nothing behind: undo removes the file if this call created it.
func createDecisionLog(cmd *cobra.Command, path string) (_ io.Writer, closeLog, undo func(), err error) {
	if path == "" || path == "-" {
		w, closeLog, err := openDecisionLog(cmd, path)
		return w, closeLog, func() {}, err
	}
	f, err := os.OpenFile(path, os.O_CREATE|os.O_EXCL|os.O_APPEND|os.O_WRONLY, 0o600)
	if errors.Is(err, fs.ErrExist) {
		w, closeLog, err := openDecisionLog(cmd, path)
		return w, closeLog, func() {}, err
	}
	if err != nil {
		return nil, nil, nil, fmt.Errorf("--decision-log: %w", err)
	}
	return f, func() { _ = f.Close() }, func() { _ = f.Close(); _ = os.Remove(path) }, nil
}
