package controlplane

import (
	"fmt"
	"net/http"

	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/trustmesh/trustmesh/ca/server"
	"github.com/trustmesh/trustmesh/ca/witness"
	"github.com/trustmesh/trustmesh/xds"
)

func (cp *ControlPlane) readyz(w http.ResponseWriter, r *http.Request) {
	if !cp.ready.Load() {
		http.Error(w, "not ready", http.StatusServiceUnavailable)
		return
	}
	if err := cp.journal.Ping(r.Context()); err != nil {
		http.Error(w, "journal unavailable", http.StatusServiceUnavailable)
		return
	}
	if err := cp.journal.Integrity(); err != nil {
		// Every issuance fails until an operator acts: not ready.
		http.Error(w, "journal does not match its signed checkpoints", http.StatusServiceUnavailable)
		return
	}
	_, _ = w.Write([]byte("ok\n"))
}

// DebugEndpointsOff is the body of a 404 from a /debug/ path when serve runs
// with --debug-endpoints=false (Config.Listen.NoDebugEndpoints).
const DebugEndpointsOff = "debug endpoints are off (trustmesh serve --debug-endpoints=false)"

// newMonitoring builds the monitoring server (health, readiness, metrics)
// and, when it has an address, the SPIFFE bundle endpoint.
func (cp *ControlPlane) newMonitoring(v *validated) error {
	mux := http.NewServeMux()
	mux.HandleFunc("/healthz", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) })
	mux.HandleFunc("/readyz", cp.readyz)
	mux.Handle("/metrics", promhttp.HandlerFor(cp.registry, promhttp.HandlerOpts{}))
	// The journal's signed checkpoints and consistency proofs, for
	// witnesses: trustmesh audit monitor --from http://ADDRESS/journal.
	mux.Handle("/journal/", http.StripPrefix("/journal", witness.SourceHandler(cp.journal)))
	switch {
	case v.Listen.NoDebugEndpoints:
		// Off, and saying so, so that trustmesh check can tell this from
		// a control plane without an xDS server.
		mux.HandleFunc("/debug/", func(w http.ResponseWriter, _ *http.Request) {
			http.Error(w, DebugEndpointsOff, http.StatusNotFound)
		})
	case cp.xds != nil:
		// The connected xDS clients, as istioctl proxy-status reads them.
		mux.Handle(xds.ClientsPath, cp.xds.ClientsHandler())
	}
	cp.monitoring = v.Listen.Connections.HTTPServer(mux)

	if v.Listen.Bundle != "" {
		h, err := server.FederationHandler(v.td, cp.authority)
		if err != nil {
			return fmt.Errorf("controlplane: bundle endpoint: %w", err)
		}
		tlsCfg := cp.serving.TLSConfig()
		tlsCfg.ClientAuth, tlsCfg.NextProtos = 0, nil
		cp.bundle = v.Listen.Connections.HTTPServer(h)
		cp.bundle.TLSConfig = tlsCfg
	}
	return nil
}
