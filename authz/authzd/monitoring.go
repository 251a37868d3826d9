package authzd

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
)

// monitoringHandler serves /healthz, /readyz and /metrics, as the control
// plane's monitoring port does, and nothing else: none of them reveals a
// policy, a request or a credential.
func (s *Service) monitoringHandler(g prometheus.Gatherer) http.Handler {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", func(w http.ResponseWriter, _ *http.Request) {
		select {
		case <-s.ready:
			_, _ = w.Write([]byte("ok\n"))
		default:
			http.Error(w, "no policy set loaded yet", http.StatusServiceUnavailable)
		}
	})
	mux.Handle("/metrics", promhttp.HandlerFor(g, promhttp.HandlerOpts{}))
	return mux
}

// serveMonitoring serves the monitoring handler on lis until ctx ends.
func (s *Service) serveMonitoring(ctx context.Context, lis net.Listener) error {
	errc := make(chan error, 1)
	go func() { errc <- s.monitoring.Serve(lis) }()
	select {
	case err := <-errc:
		return fmt.Errorf("authzd: monitoring: %w", err)
	case <-ctx.Done():
	}
	sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = s.monitoring.Shutdown(sctx)
	if err := <-errc; err != nil && !errors.Is(err, http.ErrServerClosed) {
		return fmt.Errorf("authzd: monitoring: %w", err)
	}
	return nil
}
