package controlplane

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// Kubernetes modes.
const (
	KubernetesAuto = "auto" // on when in a cluster or given a kubeconfig
	KubernetesOn   = "on"
	KubernetesOff  = "off"
)

// Config is the control plane's configuration. Load fills in defaults and
// checks it; `serve --validate` and start-up share that check.
type Config struct {
	DataDir     string
	TrustDomain string

	ListenCA         string
	ListenMonitoring string
	// ListenBundle serves the SPIFFE bundle endpoint; empty turns it off.
	ListenBundle string
	// Connections bounds every listener (CA and xDS, monitoring, bundle
	// endpoint, ext_authz, injector webhook): connections served at once,
	// and handshake, read, write and idle timeouts. Zero values take
	// connlimit's defaults.
	Connections connlimit.Config
	// CADNSNames are the DNS names and IP addresses in the CA's serving
	// certificate.
	CADNSNames []string
	// ControlPlaneID is the SPIFFE ID in the control plane's own
	// certificates. Default spiffe://TD/ns/trustmesh-system/sa/trustmesh.
	ControlPlaneID string

	// JournalDSN selects PostgreSQL for the journal and join tokens, which
	// replicas must share; empty keeps them in SQLite in DataDir.
	JournalDSN string
	// CheckpointKeyURI names the journal's Ed25519 checkpoint key in a KMS;
	// empty keeps it in DataDir. It is never the CA key.
	CheckpointKeyURI string
	// Witness, a file outside DataDir or an http(s) URL, receives every
	// signed checkpoint.
	Witness string

	// ListenAuthz is the ext_authz gRPC address (mTLS with the control
	// plane's certificate); "off" turns the authorization service off.
	ListenAuthz string
	// PolicyDir is a directory of AuthorizationPolicy YAML, watched. On
	// Kubernetes, policies come from the API server instead.
	PolicyDir string
	// RootNamespace holds mesh-wide policies. Default istio-system.
	RootNamespace string
	// DecisionLog receives authz decisions as JSON lines; nil turns it off.
	DecisionLog io.Writer
	// LogRedactPaths are patterns whose matches in request paths the
	// decision log replaces (decisionlog.PathRedactor).
	LogRedactPaths []string

	// MeshDir, off Kubernetes, is a directory of mesh YAML (services,
	// endpoints, SPIFFE IDs, labels, gateways, external hosts), watched; the
	// xDS server on the CA port configures proxies from it. On Kubernetes
	// the mesh comes from the API server.
	MeshDir string
	// AuthzAddress is the ext_authz service as proxies reach it
	// ("host:port"). Default trustmesh.trustmesh-system.svc:9191.
	AuthzAddress string
	// XDS bounds what one workload identity may hold on the xDS server;
	// zero values take the xds package's defaults.
	XDS XDSLimits
	// GatewayTrustedHops is the gateways' xff_num_trusted_hops: the
	// proxies in front of them that append to X-Forwarded-For.
	GatewayTrustedHops uint32

	// ListenInjector is the sidecar-injection webhook's address, served on
	// Kubernetes only; "off" turns injection off.
	ListenInjector string
	// MeshConfig is the mesh config file the injector reads (images, ports,
	// resources, the limits of per-pod exclusions); empty takes defaults.
	MeshConfig string
	// InjectorWebhookConfig names the MutatingWebhookConfiguration whose
	// caBundle the control plane keeps current across CA rotation.
	InjectorWebhookConfig string

	// CACertsDir holds operator-supplied CA material (Istio's layout).
	CACertsDir string
	// CAKeyURI names the CA signing key in a KMS.
	CAKeyURI string
	// ManualRotation turns off automatic rotation of self-managed CA
	// certificates; `trustmesh ca rotate` still works.
	ManualRotation bool
	// RotationInterval is how often rotation state is checked. Default 1m.
	RotationInterval time.Duration
	// CASecret ("namespace/name"), on Kubernetes, keeps self-managed CA
	// material and its rotation state in a Secret that every replica reads,
	// instead of the data directory. Rotation is then leader-elected.
	CASecret string
	// CAIntermediateTTL is the lifetime of self-managed intermediates.
	// Default one year.
	CAIntermediateTTL time.Duration

	// Kubernetes is "auto", "on" or "off".
	Kubernetes string
	Kubeconfig string
	// RestConfig, when set, is used instead of Kubeconfig or the in-cluster
	// configuration (for embedding and tests).
	RestConfig    *rest.Config
	TokenAudience string

	MinWorkloadTTL, MaxWorkloadTTL, DefaultWorkloadTTL time.Duration
	MaxEnrolmentAge                                    time.Duration

	Log   *slog.Logger
	Clock clock.WithTicker
}

// Defaults of the serve command.
const (
	DefaultDataDir          = "trustmesh-data"
	DefaultTrustDomain      = "cluster.local"
	DefaultListenCA         = ":15012"
	DefaultListenMonitoring = ":15014"
	DefaultListenBundle     = ":15016"
	DefaultListenAuthz      = ":9191"
	DefaultListenInjector   = ":15017"
	DefaultInjectorWebhook  = "trustmesh-sidecar-injector"
	DefaultNamespace        = "trustmesh-system"
)

// DefaultCADNSNames are the names in the CA's serving certificate.
var DefaultCADNSNames = []string{"trustmesh.trustmesh-system.svc", "localhost", "127.0.0.1"}

// validated is Config after defaults and checks.
type validated struct {
	Config
	td     spiffeid.TrustDomain
	cpID   spiffeid.ID
	dns    []string
	ips    []net.IP
	inKube bool
}

// Validate fills in defaults and checks every field, reporting all problems.
func (c Config) Validate() error {
	_, err := c.validate()
	return err
}

func (c Config) validate() (*validated, error) {
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	if c.TrustDomain == "" {
		c.TrustDomain = DefaultTrustDomain
	}
	if c.ListenCA == "" {
		c.ListenCA = DefaultListenCA
	}
	if c.ListenMonitoring == "" {
		c.ListenMonitoring = DefaultListenMonitoring
	}
	if c.ListenAuthz == "" {
		c.ListenAuthz = DefaultListenAuthz
	}
	if c.AuthzAddress == "" {
		c.AuthzAddress = "trustmesh." + DefaultNamespace + ".svc:9191"
	}
	if c.ListenInjector == "" {
		c.ListenInjector = DefaultListenInjector
	}
	if c.InjectorWebhookConfig == "" {
		c.InjectorWebhookConfig = DefaultInjectorWebhook
	}
	if c.CADNSNames == nil {
		c.CADNSNames = DefaultCADNSNames
	}
	if c.Kubernetes == "" {
		c.Kubernetes = KubernetesAuto
	}
	if c.TokenAudience == "" {
		c.TokenAudience = authn.DefaultAudience
	}
	if c.DefaultWorkloadTTL == 0 {
		c.DefaultWorkloadTTL = ca.DefaultTTL
	}
	if c.MinWorkloadTTL == 0 {
		c.MinWorkloadTTL = ca.DefaultMinTTL
	}
	if c.MaxWorkloadTTL == 0 {
		c.MaxWorkloadTTL = ca.DefaultMaxTTL
	}
	if c.MaxEnrolmentAge == 0 {
		c.MaxEnrolmentAge = authn.DefaultMaxEnrolmentAge
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	if c.Clock == nil {
		c.Clock = clock.RealClock{}
	}
	v := &validated{Config: c}
	var errs []error
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil {
		errs = append(errs, fmt.Errorf("trust domain %q: %w", c.TrustDomain, err))
	}
	v.td = td
	if c.ControlPlaneID == "" && err == nil {
		c.ControlPlaneID = fmt.Sprintf("spiffe://%s/ns/%s/sa/trustmesh", td.Name(), DefaultNamespace)
		v.ControlPlaneID = c.ControlPlaneID
	}
	if c.ControlPlaneID != "" {
		if v.cpID, err = spiffeid.FromString(c.ControlPlaneID); err != nil {
			errs = append(errs, fmt.Errorf("control plane SPIFFE ID %q: %w", c.ControlPlaneID, err))
		} else if !td.IsZero() && v.cpID.TrustDomain() != td {
			errs = append(errs, fmt.Errorf("control plane SPIFFE ID %s is outside trust domain %s", v.cpID, td))
		}
	}
	for _, n := range c.CADNSNames {
		if ip := net.ParseIP(n); ip != nil {
			v.ips = append(v.ips, ip)
		} else if n != "" {
			v.dns = append(v.dns, n)
		}
	}
	for name, addr := range map[string]string{"CA": c.ListenCA, "monitoring": c.ListenMonitoring, "bundle": c.ListenBundle, "authz": c.ListenAuthz} {
		if addr == "" && name == "bundle" || addr == "off" && name == "authz" || strings.HasPrefix(addr, "unix://") {
			continue
		}
		if _, _, err := net.SplitHostPort(addr); err != nil {
			errs = append(errs, fmt.Errorf("%s listen address %q: %w", name, addr, err))
		}
	}
	switch c.Kubernetes {
	case KubernetesOn:
		v.inKube = true
	case KubernetesOff:
	case KubernetesAuto:
		v.inKube = c.RestConfig != nil || c.Kubeconfig != "" || os.Getenv("KUBERNETES_SERVICE_HOST") != ""
	default:
		errs = append(errs, fmt.Errorf("kubernetes mode %q is not auto, on or off", c.Kubernetes))
	}
	if c.CASecret != "" {
		if ns, name, ok := strings.Cut(c.CASecret, "/"); !ok || ns == "" || name == "" {
			errs = append(errs, fmt.Errorf("CA secret %q is not namespace/name", c.CASecret))
		}
		if !v.inKube {
			errs = append(errs, errors.New("a CA secret needs Kubernetes"))
		}
	}
	if c.JournalDSN != "" && c.CheckpointKeyURI == "" && c.CASecret == "" {
		errs = append(errs, errors.New("replicas sharing a journal must share its checkpoint key: give --checkpoint-key-uri, or --ca-secret to keep it in a Secret"))
	}
	if c.JournalDSN != "" && c.CACertsDir == "" && c.CASecret == "" {
		errs = append(errs, errors.New("with a shared journal (replicas), the CA keys must live in a Kubernetes Secret (--ca-secret) or come from --cacerts (with --ca-key-uri for a KMS), never in a replica's own data directory"))
	}
	if c.CAKeyURI != "" && c.CACertsDir == "" {
		errs = append(errs, errors.New("a CA key URI needs operator-supplied certificates (--cacerts)"))
	}
	if c.MinWorkloadTTL <= 0 || c.MinWorkloadTTL > c.MaxWorkloadTTL {
		errs = append(errs, fmt.Errorf("minimum workload TTL %s must be positive and at most the maximum %s", c.MinWorkloadTTL, c.MaxWorkloadTTL))
	}
	if c.DefaultWorkloadTTL < c.MinWorkloadTTL || c.DefaultWorkloadTTL > c.MaxWorkloadTTL {
		errs = append(errs, fmt.Errorf("default workload TTL %s is outside [%s, %s]", c.DefaultWorkloadTTL, c.MinWorkloadTTL, c.MaxWorkloadTTL))
	}
	if c.MaxEnrolmentAge <= 0 {
		errs = append(errs, fmt.Errorf("maximum enrolment age %s must be positive", c.MaxEnrolmentAge))
	}
	if err := c.Connections.Validate(); err != nil {
		errs = append(errs, err)
	}
	if _, err := decisionlog.NewPathRedactor(c.LogRedactPaths); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("controlplane: invalid configuration: %w", errors.Join(errs...))
	}
	return v, nil
}

// XDSLimits are the xDS server's admission limits (xds.Config).
type XDSLimits struct {
	MaxStreamsPerIdentity, MaxNodesPerIdentity int
	FirstPushHold                              time.Duration
}
