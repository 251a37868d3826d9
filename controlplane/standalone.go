package controlplane

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
	"os"
	"slices"
	"strconv"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/credentials"

	"github.com/trustmesh/trustmesh/api/identity"
	"github.com/trustmesh/trustmesh/authz/authzd"
	"github.com/trustmesh/trustmesh/authz/extauthz"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/authz/source/kube"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// StandaloneAuthzConfig is `trustmesh authz`: the ext_authz service alone, beside an
// Envoy, outside the control plane.
type StandaloneAuthzConfig struct {
	// Address is "host:port" or "unix:///path".
	Address string
	// PolicyDir is a directory of AuthorizationPolicy YAML, watched.
	PolicyDir     string
	RootNamespace string
	// TLSCert, TLSKey and ClientCA, when any is set, serve mTLS.
	TLSCert, TLSKey, ClientCA string
	InsecurePlaintext         bool
	FailOpen                  bool
	Bundles                   []source.BundleConfig
	EvalTimeout               time.Duration
	// DecisionLog receives decisions as JSON lines; nil turns it off.
	DecisionLog                     io.Writer
	HeaderAllowlist, QueryAllowlist []string
	RedactPaths                     []string
	MaxConnections                  int
	// Kubernetes watches AuthorizationPolicies through Kubeconfig (or the
	// pod's service account), in WatchNamespace only when set, at
	// security.istio.io/v1beta1 when V1beta1. In a pod, bundles must be
	// signed even without it.
	Kubernetes                 bool
	Kubeconfig, WatchNamespace string
	V1beta1                    bool
	// MeshDir names the gateways whose forwarded client address
	// remote.ip trusts.
	MeshDir string
	Log     *slog.Logger
	// TracerProvider traces each Check; nil turns tracing off.
	TracerProvider trace.TracerProvider
	// Monitoring, when set, serves /healthz, /readyz and /metrics
	// (authzd.Config.Monitoring).
	Monitoring string
}

// RunAuthz assembles the ext_authz service alone and serves it until ctx
// ends.
func RunAuthz(ctx context.Context, c StandaloneAuthzConfig) error {
	cfg := authzd.Config{
		Address: c.Address, InsecurePlaintext: c.InsecurePlaintext, FailOpen: c.FailOpen,
		PolicyDir: c.PolicyDir, Bundles: c.Bundles, RootNamespace: c.RootNamespace, EvalTimeout: c.EvalTimeout,
		HeaderAllowlist: c.HeaderAllowlist, QueryAllowlist: c.QueryAllowlist, RedactPaths: c.RedactPaths,
		Connections:    connlimit.Config{MaxConnections: c.MaxConnections},
		Log:            c.Log,
		OnKubernetes:   c.Kubernetes || os.Getenv("KUBERNETES_SERVICE_HOST") != "",
		DecisionLog:    c.DecisionLog,
		TracerProvider: c.TracerProvider,
		Monitoring:     c.Monitoring,
	}
	if c.Kubernetes {
		client, err := kube.NewClient(c.Kubeconfig)
		if err != nil {
			return err
		}
		cfg.Policies = &kube.Source{Client: client, Namespace: c.WatchNamespace, V1beta1: c.V1beta1}
	}
	if c.TLSCert != "" || c.TLSKey != "" || c.ClientCA != "" {
		tc, err := authzd.ServerTLS(c.TLSCert, c.TLSKey, c.ClientCA)
		if err != nil {
			return err
		}
		cfg.Creds = credentials.NewTLS(tc)
	}
	if c.MeshDir != "" {
		cfg.Mesh = &mesh.Dir{Path: c.MeshDir}
	}
	svc, err := authzd.New(cfg)
	if err != nil {
		return namePlaintextFlag(err)
	}
	return svc.Run(ctx)
}

// namePlaintextFlag says extauthz's refusal of plaintext on TCP in the
// words of trustmesh authz's flags, keeping every other error of err.
func namePlaintextFlag(err error) error {
	errs := []error{err}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		errs = slices.Clone(j.Unwrap())
	}
	for i, e := range errs {
		if errors.Is(e, extauthz.ErrPlaintext) {
			errs[i] = &ConfigError{Group: "Authz", Flag: "insecure-plaintext", Err: plaintextError{e}}
		}
	}
	return errors.Join(errs...)
}

// plaintextError is extauthz.ErrPlaintext, told in flags.
type plaintextError struct{ err error }

func (e plaintextError) Error() string {
	return "plaintext on a TCP address is refused unless this flag is given (local testing only); serve mTLS with --tls-cert, --tls-key and --client-ca, or listen on unix:///path"
}

func (e plaintextError) Unwrap() error { return e.err }

// DumpConfig is `trustmesh xds dump`: a node's xDS resources, computed from
// mesh and policy files as the control plane computes them.
type DumpConfig struct {
	MeshDir, PolicyDir string
	TrustDomain        string
	RootNamespace      string
	// AuthzAddress is the ext_authz service as proxies reach it; empty
	// means the control plane's (api/identity).
	AuthzAddress string
	// AuthzID is the ext_authz service's SPIFFE ID; empty means the
	// control plane's in TrustDomain.
	AuthzID string
	// NodeID, ServiceAccount, Labels and Proxyless describe the node
	// (xds.DumpRequest).
	NodeID         string
	ServiceAccount string
	Labels         map[string]string
	Proxyless      bool
}

// DumpXDS renders the node's resources as JSON. A flaw in c is a
// *ConfigError.
func DumpXDS(c DumpConfig) ([]byte, error) {
	proxy, err := c.proxy()
	if err != nil {
		return nil, inGroup("XDS", err)
	}
	req := xds.DumpRequest{
		Mesh: &mesh.Dir{Path: c.MeshDir}, Proxy: proxy,
		NodeID: c.NodeID, ServiceAccount: c.ServiceAccount, Labels: c.Labels, Proxyless: c.Proxyless,
	}
	if c.PolicyDir != "" {
		req.Policies = &source.Dir{Path: c.PolicyDir, DefaultNamespace: "default"}
	}
	return xds.Dump(req)
}

func (c DumpConfig) proxy() (proxyconfig.Config, error) {
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil {
		return proxyconfig.Config{}, setting("trust-domain", err)
	}
	addr := c.AuthzAddress
	if addr == "" {
		addr = identity.AuthzAddress("")
	}
	host, portStr, err := net.SplitHostPort(addr)
	if err != nil {
		return proxyconfig.Config{}, setting("authz-address", err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return proxyconfig.Config{}, setting("authz-address", err)
	}
	idStr := c.AuthzID
	if idStr == "" {
		idStr = identity.ID(td.Name(), "")
	}
	id, err := spiffeid.FromString(idStr)
	if err != nil {
		return proxyconfig.Config{}, setting("authz-id", err)
	}
	return proxyconfig.Config{TrustDomain: td, RootNamespace: c.RootNamespace, AuthzHost: host, AuthzPort: uint32(port), AuthzID: id}, nil
}
