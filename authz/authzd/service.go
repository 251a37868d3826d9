// Package authzd assembles the authorization service: the engine, the
// policy and bundle loader with hot reload, the decision log and the
// ext_authz gRPC server, run together. `trustmesh authz` runs it alone and
// `trustmesh serve` runs it beside the CA.
package authzd

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
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/credentials"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/extauthz"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/internal/run"
	"github.com/trustmesh/trustmesh/mesh"
)

// Config configures the service.
type Config struct {
	// Address is "host:port" or "unix:///path"; empty means ":9191".
	Address string
	// Creds are the server's mTLS credentials.
	Creds             credentials.TransportCredentials
	InsecurePlaintext bool
	FailOpen          bool
	// PolicyDir is a directory of AuthorizationPolicy YAML (local mode).
	// Policies, if set, replaces it (e.g. Kubernetes informers). Feed,
	// instead, is a policy feed shared with other subscribers (the xDS
	// server), which its builder runs; the service then reads and watches
	// no policies of its own.
	PolicyDir     string
	Policies      source.PolicySource
	Feed          *source.Feed
	Bundles       []source.BundleConfig
	RootNamespace string
	EvalTimeout   time.Duration
	// DecisionLog receives JSON lines; nil disables the decision log.
	// OnKubernetes requires every bundle to be signed.
	OnKubernetes    bool
	DecisionLog     io.Writer
	HeaderAllowlist []string
	QueryAllowlist  []string
	// RedactPaths are patterns whose matches in paths the decision log
	// replaces (decisionlog.PathRedactor); checked even with no log.
	RedactPaths []string
	Log         *slog.Logger
	// Registerer, when set, receives the service's Prometheus metrics.
	Registerer prometheus.Registerer
	// Connections bounds the ext_authz listener; zero values take
	// connlimit's defaults.
	Connections connlimit.Config
	// Mesh, when set, names the mesh's gateways, whose
	// x-envoy-external-address remote.ip trusts (engine.RemoteIP); the
	// service serves only once it has read it, and follows its changes.
	// Without it no peer is a gateway.
	Mesh mesh.Source
	// TracerProvider, when set, traces each Check (extauthz.Config).
	TracerProvider trace.TracerProvider
	// Monitoring, when set, is a "host:port" serving /healthz, /readyz
	// (200 once a policy set is in force) and /metrics: Registerer's
	// metrics, or the service's own when Registerer is nil. `trustmesh
	// serve` leaves it empty and serves its registry on its own port.
	Monitoring string
}

// Service is the assembled authorization service.
type Service struct {
	Engine *engine.Engine
	loader *source.Loader
	gw     *meshGateways
	server *extauthz.Server
	dlog   *decisionlog.Logger
	ready  chan struct{} // closed after the first successful load
	// monitoring serves on monitoringAddr; nil without Config.Monitoring.
	monitoring     *http.Server
	monitoringAddr string
}

// New validates cfg (collecting every error) and assembles the service.
// Nothing is loaded or listened on until Run.
func New(cfg Config) (*Service, error) {
	var errs []error
	if cfg.PolicyDir == "" && cfg.Policies == nil && cfg.Feed == nil && len(cfg.Bundles) == 0 {
		errs = append(errs, errors.New("authzd: no policy source: set a policy directory or bundles"))
	}
	if n := btoi(cfg.PolicyDir != "") + btoi(cfg.Policies != nil) + btoi(cfg.Feed != nil); n > 1 {
		errs = append(errs, errors.New("authzd: set one of a policy directory, a policy source or a policy feed"))
	}
	if cfg.OnKubernetes {
		cfg.Bundles = append([]source.BundleConfig(nil), cfg.Bundles...)
		for i := range cfg.Bundles {
			cfg.Bundles[i].RequireSignature = true
		}
	}
	s := &Service{Engine: engine.New(), ready: make(chan struct{})}
	var once sync.Once
	onLoad := func(err error) {
		if err == nil {
			once.Do(func() { close(s.ready) })
		}
	}
	ps := cfg.Policies
	if cfg.PolicyDir != "" {
		ps = &source.Dir{Path: cfg.PolicyDir, DefaultNamespace: "default"}
	}
	var gateways engine.Gateways
	if cfg.Mesh != nil {
		s.gw = &meshGateways{src: cfg.Mesh, log: cfg.Log}
		if s.gw.log == nil {
			s.gw.log = slog.New(slog.DiscardHandler)
		}
		gateways = s.gw
	}
	var gatherer prometheus.Gatherer
	if cfg.Monitoring != "" && cfg.Registerer == nil {
		reg := prometheus.NewRegistry()
		reg.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
		cfg.Registerer, gatherer = reg, reg
	} else if g, ok := cfg.Registerer.(prometheus.Gatherer); ok {
		gatherer = g
	}
	if cfg.Monitoring != "" {
		if gatherer == nil {
			errs = append(errs, errors.New("authzd: a monitoring address needs a Registerer that is also a Gatherer"))
		} else {
			s.monitoring = cfg.Connections.HTTPServer(s.monitoringHandler(gatherer))
			s.monitoringAddr = cfg.Monitoring
		}
	}
	var err error
	s.loader, err = source.New(source.Config{
		Engine: s.Engine, Policies: ps, Feed: cfg.Feed, Bundles: cfg.Bundles, Gateways: gateways,
		RootNamespace: cfg.RootNamespace, EvalTimeout: cfg.EvalTimeout, Log: cfg.Log, OnLoad: onLoad,
		Registerer: cfg.Registerer,
	})
	errs = append(errs, err)
	var dl extauthz.DecisionLogger
	if cfg.DecisionLog != nil {
		s.dlog, err = decisionlog.New(decisionlog.Config{
			Writer: cfg.DecisionLog, HeaderAllowlist: cfg.HeaderAllowlist, QueryAllowlist: cfg.QueryAllowlist, RedactPaths: cfg.RedactPaths,
		})
		errs = append(errs, err)
		if s.dlog != nil && cfg.Registerer != nil {
			errs = append(errs, s.dlog.Register(cfg.Registerer))
		}
		dl = s.dlog
	} else {
		_, err = decisionlog.NewPathRedactor(cfg.RedactPaths)
		errs = append(errs, err)
	}
	var metrics *extauthz.Metrics
	if cfg.Registerer != nil {
		metrics = extauthz.NewMetrics(cfg.Registerer)
	}
	s.server, err = extauthz.New(extauthz.Config{
		Engine: s.Engine, Log: dl, Address: cfg.Address, Creds: cfg.Creds,
		InsecurePlaintext: cfg.InsecurePlaintext, FailOpen: cfg.FailOpen, Metrics: metrics, Connections: cfg.Connections,
		TracerProvider: cfg.TracerProvider,
	})
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return s, nil
}

// Run loads the policies (failing if the first load fails), then serves and
// hot-reloads until ctx ends or a component fails, which stops the others.
func (s *Service) Run(ctx context.Context) error {
	gwReady := make(chan struct{})
	tasks := []run.Task{s.loader.Run}
	if s.gw != nil {
		tasks = append(tasks, func(ctx context.Context) error { return s.gw.run(ctx, gwReady) })
	} else {
		close(gwReady)
	}
	if s.dlog != nil {
		tasks = append(tasks, s.dlog.Run)
	}
	if s.monitoring != nil {
		lis, err := net.Listen("tcp", s.monitoringAddr)
		if err != nil {
			return fmt.Errorf("authzd: monitoring: %w", err)
		}
		tasks = append(tasks, func(ctx context.Context) error { return s.serveMonitoring(ctx, lis) })
	}
	tasks = append(tasks, func(ctx context.Context) error {
		// Serve only once a policy set is in force; until then the engine
		// would deny everything.
		for _, ready := range []chan struct{}{s.ready, gwReady} {
			select {
			case <-ctx.Done():
				return nil
			case <-ready:
			}
		}
		return s.server.Run(ctx)
	})
	err := run.Tasks(ctx, tasks...)
	if errors.Is(err, context.Canceled) {
		return nil
	}
	return err
}

// DecisionLog is the decision log, or nil when it is off; the web UI reads
// its recent denials.
func (s *Service) DecisionLog() *decisionlog.Logger { return s.dlog }

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

// ServerTLS builds the mTLS server configuration from PEM files: the
// server's certificate and key, and the CA bundle client certificates must
// chain to. `trustmesh serve` passes its own credentials instead.
func ServerTLS(certFile, keyFile, clientCAFile string) (*tls.Config, error) {
	cert, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		return nil, fmt.Errorf("authzd: %w", err)
	}
	pem, err := os.ReadFile(clientCAFile)
	if err != nil {
		return nil, fmt.Errorf("authzd: %w", err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, fmt.Errorf("authzd: %s holds no PEM certificates", clientCAFile)
	}
	return &tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		MinVersion:   tls.VersionTLS12,
	}, nil
}
