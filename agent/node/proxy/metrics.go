package proxy

import "github.com/prometheus/client_golang/prometheus"

// Directions and reasons of the proxy's metrics.
const (
	Outbound         = "outbound"
	Inbound          = "inbound"           // HBONE, port 15008
	InboundPlaintext = "inbound_plaintext" // port 15006, always refused (STRICT)
)

// metrics are the node proxy's, in the node agent's registry.
type metrics struct {
	opened    *prometheus.CounterVec // direction
	refused   *prometheus.CounterVec // direction, reason
	closed    *prometheus.CounterVec // direction, reason
	bytes     *prometheus.CounterVec // direction
	handshake *prometheus.CounterVec // direction
	pods      *prometheus.GaugeVec   // inbound_source: tproxy or redirect
	setup     prometheus.Histogram   // the capture window
}

// Values of the pods metric's inbound_source label.
const (
	SourceTPROXY   = "tproxy"   // the application sees the remote pod's address
	SourceRedirect = "redirect" // the kernel has no TPROXY here: the pod's own address
)

func newMetrics(reg prometheus.Registerer) (*metrics, error) {
	m := &metrics{
		opened: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_node_proxy_connections_opened_total",
			Help: "Connections the node proxy carried, by direction (outbound: from a local pod; inbound: HBONE to a local pod).",
		}, []string{"direction"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_node_proxy_connections_refused_total",
			Help: "Connections the node proxy refused (reset) before carrying them, by direction and reason.",
		}, []string{"direction", "reason"}),
		closed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_node_proxy_connections_closed_total",
			Help: "Carried connections that ended, by direction and reason (done, error, policy: denied when the policy changed, shutdown).",
		}, []string{"direction", "reason"}),
		bytes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_node_proxy_bytes_total",
			Help: "Bytes carried both ways on the proxy's connections, by connection direction.",
		}, []string{"direction"}),
		handshake: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_node_proxy_hbone_handshake_failures_total",
			Help: "HBONE handshakes that failed (TLS, peer identity, version, ALPN), by direction.",
		}, []string{"direction"}),
		pods: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Name: "trustmesh_node_proxy_pods",
			Help: "Pods the node proxy captures, by how inbound connections reach the application: tproxy (from the remote pod's address) or redirect (from the pod's own address, where the kernel has no TPROXY).",
		}, []string{"inbound_source"}),
		setup: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "trustmesh_node_proxy_capture_setup_seconds",
			Help:    "Time from an ambient workload's first appearance in the node's xDS configuration to its redirection installed and its listeners open: the window in which the pod's traffic is not captured.",
			Buckets: []float64{.05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120},
		}),
	}
	for _, c := range []prometheus.Collector{m.opened, m.refused, m.closed, m.bytes, m.handshake, m.pods, m.setup} {
		if err := reg.Register(c); err != nil {
			return nil, err
		}
	}
	return m, nil
}
