package webhook

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"time"

	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// DefaultAddress is the webhook's port, as istiod's.
const DefaultAddress = ":15017"

// Config configures a Server.
type Config struct {
	// Address to listen on; default DefaultAddress.
	Address string
	// Listener, if set, is served instead of binding Address: a caller
	// that bound the port earlier (to fail its start on a port in use)
	// hands it over rather than closing it and binding again, which
	// another process could take the port in between. Close closes it.
	Listener net.Listener
	// Handler is the admission handler, from NewHandler.
	Handler http.Handler
	// GetCertificate returns the serving certificate for each handshake;
	// the control plane passes (*server.ServingCert).GetCertificate, so
	// the certificate is issued by the trustmesh CA and renewed in place.
	GetCertificate func(*tls.ClientHelloInfo) (*tls.Certificate, error)
	// ShutdownTimeout bounds a graceful stop; default 5s.
	ShutdownTimeout time.Duration
	// Connections bounds the connections served at once and their
	// timeouts; the zero value takes connlimit's defaults.
	Connections connlimit.Config
	Log         *slog.Logger
}

// Server serves the webhook over TLS.
type Server struct {
	cfg  Config
	lis  net.Listener
	http *http.Server
}

// New checks cfg and binds the listener, so that an address in use is an
// error here rather than a server that pretends to run. Call Run, or Close
// if Run will not be called.
func New(cfg Config) (*Server, error) {
	if cfg.Address == "" {
		cfg.Address = DefaultAddress
	}
	if cfg.ShutdownTimeout <= 0 {
		cfg.ShutdownTimeout = 5 * time.Second
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	var errs []error
	if cfg.Handler == nil {
		errs = append(errs, errors.New("a Handler is required"))
	}
	if cfg.GetCertificate == nil {
		errs = append(errs, errors.New("GetCertificate is required"))
	}
	if err := cfg.Connections.Validate(); err != nil {
		errs = append(errs, err)
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("webhook: %w", errors.Join(errs...))
	}
	lis := cfg.Listener
	if lis == nil {
		var err error
		if lis, err = cfg.Connections.Listen("tcp", cfg.Address); err != nil {
			return nil, fmt.Errorf("webhook: listen on %s: %w", cfg.Address, err)
		}
	}
	srv := cfg.Connections.HTTPServer(cfg.Handler)
	srv.TLSConfig = &tls.Config{
		MinVersion:     tls.VersionTLS12,
		GetCertificate: cfg.GetCertificate,
	}
	srv.ErrorLog = slog.NewLogLogger(cfg.Log.Handler(), slog.LevelWarn)
	return &Server{cfg: cfg, lis: lis, http: srv}, nil
}

// Addr is the bound address.
func (s *Server) Addr() net.Addr { return s.lis.Addr() }

// Run serves until ctx ends, then shuts down within the shutdown timeout.
// A cancelled ctx is a clean exit.
func (s *Server) Run(ctx context.Context) error {
	errc := make(chan error, 1)
	go func() { errc <- s.http.ServeTLS(s.lis, "", "") }()
	select {
	case err := <-errc:
		return fmt.Errorf("webhook: serve: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), s.cfg.ShutdownTimeout)
	defer cancel()
	err := s.http.Shutdown(sctx)
	if serr := <-errc; !errors.Is(serr, http.ErrServerClosed) {
		err = errors.Join(err, serr)
	}
	if err != nil {
		_ = s.http.Close()
		return fmt.Errorf("webhook: shut down: %w", err)
	}
	return nil
}

// Close releases the listener of a Server whose Run was never called.
func (s *Server) Close() error { return s.lis.Close() }
