package xds

import "github.com/prometheus/client_golang/prometheus"

// metrics are the xDS server's Prometheus metrics; nil records nothing.
type metrics struct {
	pushes    *prometheus.CounterVec
	connected prometheus.Gauge
}

func newMetrics(reg prometheus.Registerer) *metrics {
	if reg == nil {
		return nil
	}
	m := &metrics{
		pushes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_xds_pushes_total",
			Help: "xDS responses sent to proxies, by resource type.",
		}, []string{"type"}),
		connected: prometheus.NewGauge(prometheus.GaugeOpts{
			Name: "trustmesh_xds_connected_proxies",
			Help: "Open, authenticated ADS streams.",
		}),
	}
	reg.MustRegister(m.pushes, m.connected)
	return m
}

func (m *metrics) pushed(typeURL string) {
	if m != nil {
		m.pushes.WithLabelValues(typeURL).Inc()
	}
}

func (m *metrics) streams(delta float64) {
	if m != nil {
		m.connected.Add(delta)
	}
}
