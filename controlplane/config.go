package controlplane

import (
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.opentelemetry.io/otel/trace"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/api/identity"
	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// Config is the control plane's configuration, grouped by the component
// each part configures. Validate fills in defaults and checks it; `serve
// --validate` and start-up share that check.
type Config struct {
	// DataDir holds self-managed CA material, the journal in SQLite and
	// the checkpoint key, unless other groups put them elsewhere.
	DataDir     string
	TrustDomain string

	Listen     ListenConfig
	CA         CAConfig
	Journal    JournalConfig
	Rotation   RotationConfig
	Authz      AuthzConfig
	XDS        XDSConfig
	Injector   InjectorConfig
	Admission  AdmissionConfig
	Kubernetes KubernetesConfig
	UI         UIConfig

	Log   *slog.Logger
	Clock clock.WithTicker
	// TracerProvider (StartTracing) traces the CA, ext_authz, xDS and rotation; nil: off.
	TracerProvider trace.TracerProvider
}

// ListenConfig is where the control plane listens, and the bounds on every
// listener.
type ListenConfig struct {
	// CA is the CA's gRPC port, which also serves xDS and the trust bundle.
	CA string
	// Monitoring serves /healthz, /readyz and /metrics, and the debug
	// endpoints unless NoDebugEndpoints.
	Monitoring string
	// NoDebugEndpoints turns off the monitoring port's /debug/ endpoints
	// (the xDS clients, which name every connected proxy, its address and
	// SPIFFE ID), for a monitoring address that others can reach: they
	// answer 404, saying so.
	NoDebugEndpoints bool
	// Bundle serves the SPIFFE bundle endpoint; empty turns it off.
	Bundle string
	// Authz is the ext_authz gRPC address (mTLS with the control plane's
	// certificate); "off" turns the authorization service off.
	Authz string
	// Injector is the admission webhooks' address, served on Kubernetes
	// only: injection (/inject) and validation (/validate); "off" turns
	// both off.
	Injector string
	UI       string // the web UI (UIConfig); "" or "off" turns it off
	// Connections bounds every listener (CA and xDS, monitoring, bundle
	// endpoint, ext_authz, injector webhook, web UI): connections served at once,
	// and handshake, read, write and idle timeouts. Zero values take
	// connlimit's defaults.
	Connections connlimit.Config
}

// CAConfig configures the CA: its material, its serving certificate, the
// workload certificates it issues and whom it issues them to.
type CAConfig struct {
	// DNSNames are the DNS names and IP addresses in the CA's serving
	// certificate.
	DNSNames []string
	// ControlPlaneID is the SPIFFE ID in the control plane's own
	// certificates. Default spiffe://TD/ns/trustmesh-system/sa/trustmesh.
	ControlPlaneID string
	// CertsDir holds operator-supplied CA material (Istio's layout).
	CertsDir string
	// KeyURI names the CA signing key in a KMS.
	KeyURI string
	// Secret ("namespace/name"), on Kubernetes, keeps self-managed CA
	// material and its rotation state in a Secret that every replica reads,
	// instead of the data directory. Rotation is then leader-elected.
	Secret string
	// TokenAudience is the audience service-account tokens must carry.
	TokenAudience string

	MinWorkloadTTL, MaxWorkloadTTL, DefaultWorkloadTTL time.Duration
	// WorkloadBackdate is how far before issuance workload certificates
	// become valid. Default 30s.
	WorkloadBackdate time.Duration
	// MaxEnrolmentAge is how long a join-token enrolment may renew.
	MaxEnrolmentAge time.Duration
	// KubeStaleCacheLimit, on Kubernetes, is how long renewal re-checks
	// service accounts against a cache that has stopped hearing from the
	// apiserver. Default authn.DefaultStaleCacheLimit (5m).
	KubeStaleCacheLimit time.Duration
	// MaxClockSkew is how far the CA's clock may be behind its journal's
	// newest issuance before it stops signing. Default ca.DefaultMaxClockSkew.
	MaxClockSkew time.Duration
	// TrustedNodeAccounts ("namespace/serviceaccount"), on Kubernetes, are
	// the service accounts of node agents (`trustmesh node`) trusted for
	// delegated issuance, as Istio's CA_TRUSTED_NODE_ACCOUNTS: each may hold
	// the identities of the pods on its own node. Empty trusts none.
	TrustedNodeAccounts []string
}

// RotationConfig configures the rotation of self-managed CA certificates.
// Zero durations take the rotation package's defaults.
type RotationConfig struct {
	// Manual turns off automatic rotation; `trustmesh ca rotate` still
	// works.
	Manual bool
	// Interval is how often rotation state is checked. Default 1m.
	Interval time.Duration
	// IntermediateTTL is the lifetime of self-managed intermediates.
	// Default one year.
	IntermediateTTL time.Duration
	// RootTTL is the lifetime of self-managed roots.
	RootTTL time.Duration
	// RootPropagation is how long a new root is in the bundle before it
	// signs. Default 24h.
	RootPropagation time.Duration
	// Backdate is how far before their creation new CA certificates become
	// valid.
	Backdate time.Duration
}

// AuthzConfig configures the ext_authz service and the policies that both
// it and the RBAC pushed over xDS enforce.
type AuthzConfig struct {
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
	// Bundles are the Rego bundles CUSTOM policies evaluate (--bundle and
	// its verification flags), with those PolicyDir names in its
	// source.BundlesFile. On Kubernetes every bundle must be signed.
	Bundles source.Bundles
}

// XDSConfig configures the xDS server on the CA port.
type XDSConfig struct {
	// MeshDir, off Kubernetes, is a directory of mesh YAML (services,
	// endpoints, SPIFFE IDs, labels, gateways, external hosts), watched; the
	// xDS server configures proxies from it, and the authorization service
	// names gateways from it. On Kubernetes the mesh comes from the API
	// server.
	MeshDir string
	// AuthzAddress is the ext_authz service as proxies reach it
	// ("host:port"). Default trustmesh.trustmesh-system.svc:9191.
	AuthzAddress string
	// MaxStreamsPerIdentity, MaxNodesPerIdentity and FirstPushHold bound
	// what one workload identity may hold on the xDS server; zero values
	// take the xds package's defaults.
	MaxStreamsPerIdentity, MaxNodesPerIdentity int
	FirstPushHold                              time.Duration
	// GatewayTrustedHops is the gateways' xff_num_trusted_hops: the
	// proxies in front of them that append to X-Forwarded-For.
	GatewayTrustedHops uint32
	// Tracing gives the proxies an OpenTelemetry tracer (see xds.go).
	Tracing TracingConfig
}

// InjectorConfig configures the sidecar-injection webhook.
type InjectorConfig struct {
	// MeshConfig is the mesh config file the injector reads (images, ports,
	// resources, the limits of per-pod exclusions); empty takes defaults.
	MeshConfig string
	// WebhookConfig names the MutatingWebhookConfiguration whose caBundle
	// the control plane keeps current across CA rotation.
	WebhookConfig string
	// Disabled turns injection off; validation is still served.
	Disabled bool
}

// Defaults of the serve command. Every listener defaults to loopback, as a
// workstation expects; the Helm chart sets the addresses a pod listens on.
const (
	DefaultDataDir          = "trustmesh-data"
	DefaultTrustDomain      = "cluster.local"
	DefaultListenCA         = "127.0.0.1:15012"
	DefaultListenMonitoring = "127.0.0.1:15014"
	DefaultListenBundle     = "127.0.0.1:15016"
	DefaultListenAuthz      = "127.0.0.1:9191"
	DefaultListenInjector   = "127.0.0.1:15017"
	DefaultInjectorWebhook  = "trustmesh-sidecar-injector"
)

// DefaultCADNSNames are the names in the CA's serving certificate.
var DefaultCADNSNames = []string{identity.Host(""), "localhost", "127.0.0.1"}

// validated is Config after defaults and checks.
type validated struct {
	Config
	td     spiffeid.TrustDomain
	cpID   spiffeid.ID
	dns    []string
	ips    []net.IP
	inKube bool
	// bundles are the Rego bundles, resolved and verified (checkBundles).
	bundles []source.BundleConfig
}

// Validate fills in defaults and checks every field, reporting all problems.
func (c Config) Validate() error {
	_, err := c.validate()
	return err
}

func (c Config) validate() (*validated, error) {
	v, errs := c.settings()
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("controlplane: invalid configuration: %w", err)
	}
	return v, nil
}

// settings fills in defaults and checks every field. It returns the
// configuration as far as it could check it, and every problem.
func (c Config) settings() (*validated, []error) {
	if c.DataDir == "" {
		c.DataDir = DefaultDataDir
	}
	if c.TrustDomain == "" {
		c.TrustDomain = DefaultTrustDomain
	}
	if c.Log == nil {
		c.Log = slog.Default()
	}
	if c.Clock == nil {
		c.Clock = clock.RealClock{}
	}
	c.Listen.setDefaults()
	c.CA.setDefaults()
	c.XDS.setDefaults()
	c.Injector.setDefaults()
	c.Admission.setDefaults()
	c.Kubernetes.setDefaults()
	v := &validated{Config: c}
	td, err := spiffeid.TrustDomainFromString(c.TrustDomain)
	if err != nil {
		err = setting("trust-domain", fmt.Errorf("%q: %w", c.TrustDomain, err))
	}
	v.td = td
	errs := []error{inGroup("TrustDomain", err)}
	v.inKube, err = c.Kubernetes.enabled()
	if err != nil {
		err = setting("kubernetes", err)
	}
	errs = append(errs, inGroup("Kubernetes", err))
	errs = append(errs, inGroup("Listen", c.Listen.check()...))
	errs = append(errs, inGroup("CA", c.CA.check(v)...))
	errs = append(errs, inGroup("Journal", c.Journal.check(c.CA)...))
	errs = append(errs, inGroup("Rotation", c.Rotation.policy(c.CA).Validate()))
	errs = append(errs, inGroup("Authz", c.Authz.check()...))
	errs = append(errs, inGroup("Authz", c.Authz.checkBundles(v)...))
	errs = append(errs, inGroup("UI", c.UI.check(c.Listen.UI)...))
	errs = append(errs, inGroup("XDS", c.XDS.check()...))
	return v, errs
}

func (c *CAConfig) setDefaults() {
	if c.DNSNames == nil {
		c.DNSNames = DefaultCADNSNames
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
	if c.KubeStaleCacheLimit == 0 {
		c.KubeStaleCacheLimit = authn.DefaultStaleCacheLimit
	}
	if c.MaxClockSkew == 0 {
		c.MaxClockSkew = ca.DefaultMaxClockSkew
	}
}

// check checks the CA group and fills in v's control-plane ID and the
// serving certificate's names.
func (c *CAConfig) check(v *validated) []error {
	var errs []error
	if c.ControlPlaneID == "" && !v.td.IsZero() {
		c.ControlPlaneID = identity.ID(v.td.Name(), "")
		v.CA.ControlPlaneID = c.ControlPlaneID
	}
	if c.ControlPlaneID != "" {
		var err error
		if v.cpID, err = spiffeid.FromString(c.ControlPlaneID); err != nil {
			errs = append(errs, fmt.Errorf("control plane SPIFFE ID %q: %w", c.ControlPlaneID, err))
		} else if !v.td.IsZero() && v.cpID.TrustDomain() != v.td {
			errs = append(errs, fmt.Errorf("control plane SPIFFE ID %s is outside trust domain %s", v.cpID, v.td))
		}
	}
	for _, n := range c.DNSNames {
		if ip := net.ParseIP(n); ip != nil {
			v.ips = append(v.ips, ip)
		} else if n != "" {
			v.dns = append(v.dns, n)
		}
	}
	if c.Secret != "" {
		if ns, name, ok := strings.Cut(c.Secret, "/"); !ok || ns == "" || name == "" {
			errs = append(errs, setting("ca-secret", fmt.Errorf("%q is not namespace/name", c.Secret)))
		}
		if !v.inKube {
			errs = append(errs, setting("ca-secret", errors.New("a CA secret needs Kubernetes (--kubernetes=on, or --kubeconfig)")))
		}
	}
	if c.KeyURI != "" && c.CertsDir == "" {
		errs = append(errs, setting("ca-key-uri", errors.New("a CA key URI needs operator-supplied certificates (--cacerts)")))
	}
	if c.MinWorkloadTTL <= 0 || c.MinWorkloadTTL > c.MaxWorkloadTTL {
		errs = append(errs, setting("min-workload-ttl", fmt.Errorf("%s must be positive and at most --max-workload-ttl %s", c.MinWorkloadTTL, c.MaxWorkloadTTL)))
	}
	backdate := c.WorkloadBackdate
	if backdate == 0 {
		backdate = ca.DefaultBackdate
	}
	if c.MinWorkloadTTL > 0 && c.MinWorkloadTTL < 2*backdate {
		// A certificate lives TTL plus the backdate, and an agent renews it
		// at half that life: (TTL-backdate)/2 after issuance, which is at
		// once for a TTL at or below the backdate, and within seconds
		// close above it, so such agents renew in a loop.
		errs = append(errs, setting("min-workload-ttl", fmt.Errorf("%s must be at least %s, twice the %s workload certificates are backdated: agents renew at half a certificate's life counted from its backdated start, so a shorter certificate is renewed within seconds of its issue, over and over",
			c.MinWorkloadTTL, 2*backdate, backdate)))
	}
	if c.DefaultWorkloadTTL < c.MinWorkloadTTL || c.DefaultWorkloadTTL > c.MaxWorkloadTTL {
		errs = append(errs, setting("default-workload-ttl", fmt.Errorf("%s is outside [%s, %s] (--min-workload-ttl, --max-workload-ttl)", c.DefaultWorkloadTTL, c.MinWorkloadTTL, c.MaxWorkloadTTL)))
	}
	if c.MaxEnrolmentAge <= 0 {
		errs = append(errs, setting("max-enrolment-age", fmt.Errorf("%s must be positive", c.MaxEnrolmentAge)))
	}
	if c.KubeStaleCacheLimit <= 0 {
		errs = append(errs, setting("kube-stale-cache-limit", fmt.Errorf("%s must be positive", c.KubeStaleCacheLimit)))
	}
	if c.MaxClockSkew <= 0 {
		errs = append(errs, setting("ca-max-clock-skew", fmt.Errorf("%s must be positive", c.MaxClockSkew)))
	}
	errs = append(errs, checkTrustedNodeAccounts(c.TrustedNodeAccounts, v.inKube)...)
	return errs
}

func (c *AuthzConfig) check() []error {
	_, err := decisionlog.NewPathRedactor(c.LogRedactPaths)
	return []error{setting("log-redact-path", err)}
}

// checkBundles resolves the Rego bundles into v and reads and verifies
// each once, so that `serve --validate` refuses a bundle that is missing,
// broken or, on Kubernetes, unsigned, as a start would.
func (c *AuthzConfig) checkBundles(v *validated) []error {
	var errs []error
	if len(c.Bundles.Paths) > 0 && c.PolicyDir == "" && !v.inKube {
		errs = append(errs, setting("bundle", errors.New("bundles serve CUSTOM AuthorizationPolicies: give --policies too (or run on Kubernetes)")))
	}
	b := c.Bundles
	b.RequireSignature = b.RequireSignature || v.inKube
	bs, err := b.Configs(c.PolicyDir)
	if err != nil {
		return append(errs, err)
	}
	for _, bc := range bs {
		if _, err := source.LoadBundle(bc); err != nil {
			errs = append(errs, err) // names the bundle
		}
	}
	v.bundles = bs
	return errs
}

// policy is the rotation policy the CA runs with; validating it checks that
// a renewal just before an intermediate's activation is never cut short.
func (c *RotationConfig) policy(ca CAConfig) rotation.Policy {
	return rotation.Config{
		MaxWorkloadTTL: ca.MaxWorkloadTTL, IntermediateLifetime: c.IntermediateTTL, RootLifetime: c.RootTTL,
		RootPropagation: c.RootPropagation, Backdate: c.Backdate, Interval: c.Interval,
	}.Policy()
}

func (c *XDSConfig) setDefaults() {
	if c.AuthzAddress == "" {
		c.AuthzAddress = identity.AuthzAddress("")
	}
}

func (c *InjectorConfig) setDefaults() {
	if c.WebhookConfig == "" {
		c.WebhookConfig = DefaultInjectorWebhook
	}
}
