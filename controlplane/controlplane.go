// Package controlplane assembles trustmesh's control plane from its
// components and runs it: the CA on its gRPC port, the SPIFFE bundle
// endpoint, and health and metrics on the monitoring port. `trustmesh serve`
// is a thin wrapper around it.
package controlplane

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/sync/errgroup"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"
	"istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"k8s.io/utils/clock"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/authz/authzd"
	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/authz/source/kube"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/ca/server"
	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/injector/cabundle"
	"github.com/trustmesh/trustmesh/injector/webhook"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
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

// ControlPlane is a loaded control plane with its listeners bound.
type ControlPlane struct {
	cfg       *validated
	Authority *authority.Authority
	CA        *ca.CA
	Journal   *journal.Store
	refusals  *journal.RefusalLog
	witness   *journal.ExportWitness
	rotation  *rotation.Manager
	elector   *elector
	authz     *authzd.Service
	injector  *webhook.Server
	xds       *xds.Server
	bundleFns []func(context.Context) error // caBundle patcher, root-cert publisher
	stopping  chan struct{}
	serving   *server.ServingCert
	registry  *prometheus.Registry

	grpc       *grpc.Server
	monitoring *http.Server
	bundle     *http.Server
	caLis      net.Listener
	monLis     net.Listener
	bundleLis  net.Listener
	ready      atomic.Bool
}

// New loads the CA material and the journal and binds every listener. An
// error leaves nothing running.
func New(ctx context.Context, cfg Config) (_ *ControlPlane, err error) {
	v, err := cfg.validate()
	if err != nil {
		return nil, err
	}
	cp := &ControlPlane{cfg: v, registry: prometheus.NewRegistry()}
	defer func() {
		if err != nil {
			cp.close()
		}
	}()
	dir := DataDir(v.DataDir)
	jo := JournalOptions{DSN: v.JournalDSN, CheckpointKeyURI: v.CheckpointKeyURI, Log: v.Log}
	if v.CASecret != "" && v.CheckpointKeyURI == "" {
		// Replicas share the journal, so they share its checkpoint key.
		if jo.Kube, err = kubeClient(v.RestConfig, v.Kubeconfig); err != nil {
			return nil, err
		}
		jo.CheckpointSecret = v.CASecret + "-checkpoint"
	}
	if v.Witness != "" {
		cp.witness = journal.NewExportWitness(v.Witness, v.Log)
		jo.Witness = cp.witness
	}
	if cp.Journal, _, err = dir.OpenJournal(ctx, v.td.Name(), jo, false); err != nil {
		return nil, err
	}
	var store rotation.Store
	var isLeader func() bool
	if v.CASecret != "" {
		client, err := kubeClient(v.RestConfig, v.Kubeconfig)
		if err != nil {
			return nil, err
		}
		ns, name, _ := strings.Cut(v.CASecret, "/")
		store = rotation.SecretStore{Client: client, Namespace: ns, Name: name}
		if cp.elector, err = newElector(client, ns, name+"-rotation", v.Log); err != nil {
			return nil, err
		}
		isLeader = cp.elector.IsLeader
	}
	if cp.rotation, err = rotation.New(rotation.Config{
		Store: store, IsLeader: isLeader,
		Dir: dir.CADir(), TrustDomain: v.td, Recorder: cp.Journal, Clock: v.Clock, Log: v.Log,
		MaxWorkloadTTL: v.MaxWorkloadTTL, Interval: v.RotationInterval, Automatic: !v.ManualRotation,
		IntermediateLifetime: v.CAIntermediateTTL,
	}); err != nil {
		return nil, err
	}
	if v.CACertsDir != "" {
		// Operator-supplied material: adopted as the first generation, its
		// key referenced where the operator keeps it, never copied.
		if err := cp.rotation.Adopt(ctx, v.CACertsDir, v.CAKeyURI); err != nil {
			return nil, err
		}
	}
	material, err := cp.rotation.Initial(ctx)
	if err != nil {
		return nil, err
	}
	cp.Authority = authority.New(v.td, material)
	if cp.CA, err = ca.New(ca.Config{
		TrustDomain: v.td, Authority: cp.Authority, Recorder: cp.Journal, Clock: v.Clock,
		DefaultTTL: v.DefaultWorkloadTTL, MinTTL: v.MinWorkloadTTL, MaxTTL: v.MaxWorkloadTTL,
		Reserved: []spiffeid.ID{v.cpID},
	}); err != nil {
		return nil, err
	}
	authenticator := &authn.Authenticator{
		TrustDomain: v.td,
		JoinTokens:  &authn.JoinTokens{TrustDomain: v.td, Store: cp.Journal, Clock: v.Clock},
		Renewal: &authn.Renewal{
			TrustDomain: v.td, Bundle: cp.Authority, Store: cp.Journal,
			MaxEnrolmentAge: v.MaxEnrolmentAge, Clock: v.Clock,
		},
	}
	if v.inKube {
		client, err := kubeClient(v.RestConfig, v.Kubeconfig)
		if err != nil {
			return nil, err
		}
		if authenticator.Kubernetes, err = authn.NewKubernetes(authn.KubernetesConfig{
			TrustDomain: v.td, Client: client, Audience: v.TokenAudience, Clock: v.Clock,
		}); err != nil {
			return nil, err
		}
		authenticator.Renewal.Kubernetes = authenticator.Kubernetes
	}
	cp.refusals = journal.NewRefusalLog(journal.RefusalLogConfig{Appender: cp.Journal, Clock: v.Clock, Log: v.Log})
	cp.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	metrics := server.NewMetrics(cp.registry, cp.Authority.Current)

	if cp.serving, err = server.NewServingCert(ctx, server.ServingCertConfig{
		Issuer: cp.CA, ID: v.cpID, DNSNames: v.dns, IPs: v.ips, Clock: v.Clock, Log: v.Log,
		Issuing: func() *x509.Certificate { return cp.Authority.Current().Cert },
	}); err != nil {
		return nil, err
	}
	// Requests on this port are small (a CSR is at most 16 KiB); refuse
	// anything larger before reading it.
	cp.grpc = grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(cp.serving.TLSConfig())),
		grpc.MaxRecvMsgSize(256 << 10), grpc.MaxConcurrentStreams(1024)}, v.Connections.GRPCOptions()...)...)
	pb.RegisterIstioCertificateServiceServer(cp.grpc, server.NewCertificateService(server.CertificateServiceConfig{
		Issuer: cp.CA, Authenticator: authenticator, Refusals: cp.refusals, Metrics: metrics, Clock: v.Clock, Log: v.Log,
	}))
	if cp.xds, err = cp.newXDS(v); err != nil {
		return nil, err
	}
	if cp.xds != nil {
		cp.xds.Register(cp.grpc)
	}
	cp.stopping = make(chan struct{})
	cav1.RegisterTrustBundleServiceServer(cp.grpc, &server.BundleService{Bundles: cp.Authority, Done: cp.stopping})

	if cp.authz, err = cp.newAuthz(v); err != nil {
		return nil, err
	}
	if err := cp.newInjector(v); err != nil {
		return nil, err
	}

	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", cp.readyz)
	mux.Handle("/metrics", promhttp.HandlerFor(cp.registry, promhttp.HandlerOpts{}))
	cp.monitoring = v.Connections.HTTPServer(mux)

	if v.ListenBundle != "" {
		h, err := server.FederationHandler(v.td, cp.Authority)
		if err != nil {
			return nil, fmt.Errorf("controlplane: bundle endpoint: %w", err)
		}
		tlsCfg := cp.serving.TLSConfig()
		tlsCfg.ClientAuth, tlsCfg.NextProtos = 0, nil
		cp.bundle = v.Connections.HTTPServer(h)
		cp.bundle.TLSConfig = tlsCfg
	}

	if cp.caLis, err = listen(v, v.ListenCA, "CA"); err != nil {
		return nil, err
	}
	if cp.monLis, err = listen(v, v.ListenMonitoring, "monitoring"); err != nil {
		return nil, err
	}
	if cp.bundle != nil {
		if cp.bundleLis, err = listen(v, v.ListenBundle, "bundle endpoint"); err != nil {
			return nil, err
		}
	}
	return cp, nil
}

// newAuthz assembles the ext_authz service when there is policy to enforce:
// a policy directory, or AuthorizationPolicies on Kubernetes. It serves mTLS
// with the control plane's own certificate and accepts only clients with a
// certificate that verifies against the trust bundle in force.
func (cp *ControlPlane) newAuthz(v *validated) (*authzd.Service, error) {
	if v.ListenAuthz == "off" || v.PolicyDir == "" && !v.inKube {
		v.Log.Info("authorization service off: no --policies directory and not on Kubernetes")
		return nil, nil
	}
	tlsCfg := &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: cp.serving.GetCertificate,
		ClientAuth:     tls.RequireAnyClientCert,
		NextProtos:     []string{"h2"},
		VerifyPeerCertificate: func(raw [][]byte, _ [][]*x509.Certificate) error {
			_, _, err := x509svid.ParseAndVerify(raw, cp.Authority, x509svid.WithTime(v.Clock.Now()))
			return err
		},
	}
	cfg := authzd.Config{
		Address: v.ListenAuthz, Creds: credentials.NewTLS(tlsCfg), PolicyDir: v.PolicyDir,
		RootNamespace: v.RootNamespace, DecisionLog: v.DecisionLog, Log: v.Log, OnKubernetes: v.inKube,
		Registerer: cp.registry, RedactPaths: v.LogRedactPaths, Connections: v.Connections,
	}
	var err error
	if cfg.Mesh, err = meshSource(v); err != nil {
		return nil, err
	}
	if v.inKube && v.PolicyDir == "" {
		restCfg, err := restConfig(v.RestConfig, v.Kubeconfig)
		if err != nil {
			return nil, err
		}
		client, err := versioned.NewForConfig(restCfg)
		if err != nil {
			return nil, fmt.Errorf("controlplane: Istio client: %w", err)
		}
		cfg.Policies = &kube.Source{Client: client}
	}
	svc, err := authzd.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	return svc, nil
}

// XDSLimits are the xDS server's admission limits (xds.Config).
type XDSLimits struct {
	MaxStreamsPerIdentity, MaxNodesPerIdentity int
	FirstPushHold                              time.Duration
}

// newXDS assembles the ADS server that joins the CA port, when there is a
// mesh to serve: a --mesh directory, or the cluster on Kubernetes. It takes
// its policies from the same place the authorization service does.
func (cp *ControlPlane) newXDS(v *validated) (*xds.Server, error) {
	if v.MeshDir == "" && !v.inKube {
		v.Log.Info("xDS server off: no --mesh directory and not on Kubernetes")
		return nil, nil
	}
	host, portStr, err := net.SplitHostPort(v.AuthzAddress)
	if err != nil {
		return nil, fmt.Errorf("controlplane: authz address %q: %w", v.AuthzAddress, err)
	}
	port, err := strconv.ParseUint(portStr, 10, 16)
	if err != nil {
		return nil, fmt.Errorf("controlplane: authz address %q: %w", v.AuthzAddress, err)
	}
	cfg := xds.Config{
		Bundle: cp.Authority,
		Proxy: proxyconfig.Config{TrustDomain: v.td, RootNamespace: v.RootNamespace,
			AuthzHost: host, AuthzPort: uint32(port), AuthzID: v.cpID, GatewayTrustedHops: v.GatewayTrustedHops},
		MaxStreamsPerIdentity: v.XDS.MaxStreamsPerIdentity, MaxNodesPerIdentity: v.XDS.MaxNodesPerIdentity,
		FirstPushHold: v.XDS.FirstPushHold,
		Clock:         v.Clock, Log: v.Log, Registerer: cp.registry,
	}
	if cfg.Mesh, err = meshSource(v); err != nil {
		return nil, err
	}
	if v.PolicyDir != "" {
		cfg.Policies = &source.Dir{Path: v.PolicyDir, DefaultNamespace: "default"}
	}
	if v.inKube && cfg.Policies == nil {
		restCfg, err := restConfig(v.RestConfig, v.Kubeconfig)
		if err != nil {
			return nil, err
		}
		istio, err := versioned.NewForConfig(restCfg)
		if err != nil {
			return nil, fmt.Errorf("controlplane: Istio client: %w", err)
		}
		cfg.Policies = &kube.Source{Client: istio}
	}
	srv, err := xds.New(cfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	return srv, nil
}

// newInjector assembles the sidecar-injection webhook on Kubernetes: it
// serves TLS with the control plane's own certificate, and the control
// plane keeps the webhook configuration's caBundle, and the root
// certificate ConfigMap that injected pods read, current across rotation.
func (cp *ControlPlane) newInjector(v *validated) error {
	if !v.inKube || v.ListenInjector == "off" {
		return nil
	}
	mesh, err := injector.LoadMeshConfig(v.MeshConfig)
	if err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	inj, err := injector.New(injector.Config{Mesh: mesh})
	if err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	h, err := webhook.NewHandler(webhook.HandlerConfig{Injector: inj, Registerer: cp.registry, Log: v.Log})
	if err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	client, err := kubeClient(v.RestConfig, v.Kubeconfig)
	if err != nil {
		return err
	}
	patcher, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{Client: client, Name: v.InjectorWebhookConfig, Bundle: cp.Authority, Log: v.Log})
	if err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	publisher, err := cabundle.NewRootCertPublisher(cabundle.RootCertConfig{Client: client, Bundle: cp.Authority, Log: v.Log})
	if err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	if cp.injector, err = webhook.New(webhook.Config{
		Address: v.ListenInjector, Handler: h, GetCertificate: cp.serving.GetCertificate, Connections: v.Connections, Log: v.Log,
	}); err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	cp.bundleFns = append(cp.bundleFns, patcher.Run, publisher.Run)
	return nil
}

func listen(v *validated, addr, what string) (net.Listener, error) {
	l, err := v.Connections.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("controlplane: listen for %s on %s: %w", what, addr, err)
	}
	return l, nil
}

// IsLeader reports whether this replica runs singleton work (CA rotation).
// Without leader election every control plane is its own leader.
func (cp *ControlPlane) IsLeader() bool { return cp.elector == nil || cp.elector.IsLeader() }

// Rotation is the CA rotation manager.
func (cp *ControlPlane) Rotation() *rotation.Manager { return cp.rotation }

// Addrs are the bound addresses, useful when listening on port 0.
type Addrs struct {
	CA, Monitoring, Bundle net.Addr
}

// Addrs returns the bound listener addresses.
func (cp *ControlPlane) Addrs() Addrs {
	a := Addrs{CA: cp.caLis.Addr(), Monitoring: cp.monLis.Addr()}
	if cp.bundleLis != nil {
		a.Bundle = cp.bundleLis.Addr()
	}
	return a
}

// Run serves until ctx ends or a server fails, then stops everything. A
// cancelled ctx is a clean exit.
func (cp *ControlPlane) Run(ctx context.Context) error {
	defer cp.close()
	g, gctx := errgroup.WithContext(ctx)
	g.Go(func() error { return cp.refusals.Run(gctx) })
	g.Go(func() error { return cp.Journal.Watch(gctx) })
	if cp.witness != nil {
		g.Go(func() error { return cp.witness.Run(gctx) })
	}
	if cp.rotation != nil {
		g.Go(func() error { return cp.rotation.Run(gctx, cp.Authority.Replace) })
	}
	if cp.elector != nil {
		g.Go(func() error { return cp.elector.Run(gctx) })
	}
	if cp.authz != nil {
		g.Go(func() error { return cp.authz.Run(gctx) })
	}
	if cp.injector != nil {
		g.Go(func() error { return cp.injector.Run(gctx) })
	}
	if cp.xds != nil {
		g.Go(func() error { return cp.xds.Run(gctx) })
	}
	for _, run := range cp.bundleFns {
		g.Go(func() error { return run(gctx) })
	}
	g.Go(func() error {
		if err := cp.grpc.Serve(cp.caLis); err != nil {
			return fmt.Errorf("controlplane: CA server: %w", err)
		}
		return nil
	})
	g.Go(func() error { return serveHTTP(cp.monitoring, cp.monLis, false, "monitoring") })
	if cp.bundle != nil {
		g.Go(func() error { return serveHTTP(cp.bundle, cp.bundleLis, true, "bundle endpoint") })
	}
	g.Go(func() error {
		<-gctx.Done()
		cp.ready.Store(false)
		close(cp.stopping)
		stopped := make(chan struct{})
		go func() { cp.grpc.GracefulStop(); close(stopped) }()
		select {
		case <-stopped:
		case <-time.After(10 * time.Second):
			cp.grpc.Stop()
		}
		sctx, cancel := context.WithTimeout(context.WithoutCancel(gctx), 5*time.Second)
		defer cancel()
		errs := []error{cp.monitoring.Shutdown(sctx)}
		if cp.bundle != nil {
			errs = append(errs, cp.bundle.Shutdown(sctx))
		}
		return errors.Join(errs...)
	})
	a := cp.Addrs()
	cp.cfg.Log.Info("trustmesh control plane serving", "trust_domain", cp.cfg.td.Name(),
		"ca", a.CA.String(), "monitoring", a.Monitoring.String(), "bundle_endpoint", addrString(a.Bundle),
		"data_dir", cp.cfg.DataDir, "kubernetes", cp.cfg.inKube)
	cp.ready.Store(true)
	err := g.Wait()
	if errors.Is(err, context.Canceled) || (err == nil && ctx.Err() != nil) {
		return nil
	}
	return err
}

func serveHTTP(s *http.Server, l net.Listener, tls bool, what string) error {
	var err error
	if tls {
		err = s.ServeTLS(l, "", "")
	} else {
		err = s.Serve(l)
	}
	if err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("controlplane: %s server: %w", what, err)
	}
	return nil
}

func (cp *ControlPlane) readyz(w http.ResponseWriter, r *http.Request) {
	if !cp.ready.Load() {
		http.Error(w, "not ready", http.StatusServiceUnavailable)
		return
	}
	if err := cp.Journal.Ping(r.Context()); err != nil {
		http.Error(w, "journal unavailable", http.StatusServiceUnavailable)
		return
	}
	if err := cp.Journal.Integrity(); err != nil {
		// Every issuance fails until an operator acts: not ready.
		http.Error(w, "journal does not match its signed checkpoints", http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}

func (cp *ControlPlane) close() {
	if cp.injector != nil {
		_ = cp.injector.Close()
	}
	for _, l := range []net.Listener{cp.caLis, cp.monLis, cp.bundleLis} {
		if l != nil {
			_ = l.Close()
		}
	}
	if cp.Journal != nil {
		_ = cp.Journal.Close()
	}
}

func addrString(a net.Addr) string {
	if a == nil {
		return ""
	}
	return a.String()
}

func restConfig(cfg *rest.Config, kubeconfig string) (*rest.Config, error) {
	var err error
	switch {
	case cfg != nil:
	case kubeconfig != "":
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	default:
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("controlplane: Kubernetes client configuration: %w", err)
	}
	return cfg, nil
}

func kubeClient(cfg *rest.Config, kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := restConfig(cfg, kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: Kubernetes client: %w", err)
	}
	return client, nil
}
