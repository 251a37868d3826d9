// Package monitoring serves the agent's health and metrics over HTTP:
// /healthz answers 200 while the agent holds a valid certificate and a trust
// bundle, 503 otherwise; /metrics is Prometheus, including the current
// certificate's expiry; /app-health/ is the pod's own probes, when the
// agent is given them (package apphealth).
//
// In a pod it listens on every address, for the kubelet, and answers anyone
// without authentication. So it serves those three and nothing else, none
// of which reveals a secret: no key, token or certificate, no debugging
// endpoint. Anything more belongs on a loopback or unix-socket listener.
package monitoring

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent/apphealth"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/svid"
	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// Source is the agent's identity.
type Source interface {
	Load() (identity.Snapshot, <-chan struct{})
}

// Config configures a Server.
type Config struct {
	// Address is host:port to listen on.
	Address string
	Source  Source
	Clock   clock.PassiveClock
	// Registry receives the expiry gauges and is served on /metrics.
	Registry *prometheus.Registry
	// AppHealth, if set, serves GET /app-health/: an apphealth.Handler.
	AppHealth http.Handler
	// Health, if set, decides /healthz instead of Source's certificate:
	// nil is healthy (and ok the answer's text), an error is why not. The
	// node agent, which holds many identities, uses it.
	Health func() (ok string, err error)
	// Why, if set, says why the agent holds no valid certificate
	// (rotation.Manager.Health): /healthz answers it, in place of its own
	// short reason, whenever that says unhealthy, and nil is ignored.
	Why    func() error
	Logger *slog.Logger
	// Connections bounds the connections served at once and their
	// timeouts; the zero value takes connlimit's defaults.
	Connections connlimit.Config
}

// Server is the monitoring HTTP server.
type Server struct {
	cfg     Config
	handler http.Handler

	mu   sync.Mutex
	addr net.Addr
}

// New registers the identity gauges and returns a server.
func New(cfg Config) (*Server, error) {
	if cfg.Source == nil || cfg.Clock == nil || cfg.Registry == nil {
		return nil, errors.New("monitoring: Source, Clock and Registry are required")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	s := &Server{cfg: cfg}
	gauges := []prometheus.Collector{
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "trustmesh_agent_svid_expiry_timestamp_seconds",
			Help: "When the current certificate expires, as a Unix time; 0 without one.",
		}, func() float64 {
			snap, _ := cfg.Source.Load()
			if snap.SVID == nil {
				return 0
			}
			return float64(svid.Expiry(snap.SVID).Unix())
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "trustmesh_agent_svid_remaining_seconds",
			Help: "Seconds until the current certificate expires; 0 without one.",
		}, func() float64 {
			snap, _ := cfg.Source.Load()
			if snap.SVID == nil {
				return 0
			}
			return max(0, svid.Expiry(snap.SVID).Sub(cfg.Clock.Now()).Seconds())
		}),
		prometheus.NewGaugeFunc(prometheus.GaugeOpts{
			Name: "trustmesh_agent_bundle_roots",
			Help: "Roots in the current trust bundle.",
		}, func() float64 {
			snap, _ := cfg.Source.Load()
			if snap.Bundle == nil {
				return 0
			}
			return float64(len(snap.Bundle.X509Authorities()))
		}),
	}
	for _, g := range gauges {
		if err := cfg.Registry.Register(g); err != nil {
			return nil, fmt.Errorf("monitoring: register metrics: %w", err)
		}
	}
	mux := http.NewServeMux()
	mux.HandleFunc("GET /healthz", s.healthz)
	mux.Handle("GET /metrics", promhttp.HandlerFor(cfg.Registry, promhttp.HandlerOpts{Registry: cfg.Registry}))
	if cfg.AppHealth != nil {
		mux.Handle("GET "+apphealth.PathPrefix, cfg.AppHealth)
	}
	s.handler = mux
	return s, nil
}

// Handler returns the HTTP handler.
func (s *Server) Handler() http.Handler { return s.handler }

// Addr returns the listening address once Run listens, else nil.
func (s *Server) Addr() net.Addr {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.addr
}

func (s *Server) healthz(w http.ResponseWriter, _ *http.Request) {
	if s.cfg.Health != nil {
		ok, err := s.cfg.Health()
		if err != nil {
			http.Error(w, err.Error(), http.StatusServiceUnavailable)
			return
		}
		fmt.Fprintf(w, "ok: %s\n", ok)
		return
	}
	snap, _ := s.cfg.Source.Load()
	now := s.cfg.Clock.Now()
	var why string
	switch {
	case snap.Bundle == nil:
		why = "no trust bundle yet"
	case snap.SVID == nil:
		why = "no valid certificate"
	case !now.Before(svid.Expiry(snap.SVID)):
		why = "certificate expired"
	default:
		fmt.Fprintf(w, "ok: %s, expires %s\n", snap.SVID.ID, svid.Expiry(snap.SVID).UTC().Format(time.RFC3339))
		return
	}
	if s.cfg.Why != nil {
		if err := s.cfg.Why(); err != nil {
			why = err.Error()
		}
	}
	http.Error(w, why, http.StatusServiceUnavailable)
}

// Run serves until ctx ends. It returns the listen error if it cannot
// listen, else ctx.Err() after shutting down.
func (s *Server) Run(ctx context.Context) error {
	lis, err := s.cfg.Connections.Listen("tcp", s.cfg.Address)
	if err != nil {
		return fmt.Errorf("monitoring: %w", err)
	}
	s.mu.Lock()
	s.addr = lis.Addr()
	s.mu.Unlock()
	srv := s.cfg.Connections.HTTPServer(s.handler)
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(lis) }()
	s.cfg.Logger.Info("serving health and metrics", "address", lis.Addr().String())
	select {
	case err := <-errc:
		return fmt.Errorf("monitoring: %w", err)
	case <-ctx.Done():
	}
	shutdownCtx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = srv.Shutdown(shutdownCtx)
	<-errc
	return ctx.Err()
}
