package extauthz

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the authorization service's Prometheus metrics.
type Metrics struct {
	decisions *prometheus.CounterVec
	latency   prometheus.Histogram
}

// NewMetrics registers the metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		decisions: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_authz_decisions_total",
			Help: "ext_authz decisions, by result: allow, deny, or error (an evaluation error, which denies unless failing open).",
		}, []string{"result"}),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "trustmesh_authz_check_duration_seconds",
			Help:    "Time to decide one ext_authz Check.",
			Buckets: prometheus.ExponentialBuckets(5e-6, 2, 16),
		}),
	}
	reg.MustRegister(m.decisions, m.latency)
	return m
}

func (m *Metrics) observe(allowed, errored bool, d time.Duration) {
	if m == nil {
		return
	}
	result := "deny"
	switch {
	case errored:
		result = "error"
	case allowed:
		result = "allow"
	}
	m.decisions.WithLabelValues(result).Inc()
	m.latency.Observe(d.Seconds())
}
