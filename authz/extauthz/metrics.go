package extauthz

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metrics are the authorization service's Prometheus metrics.
type Metrics struct {
	// allow, deny and errored are trustmesh_authz_decisions_total's
	// series, resolved once rather than looked up by label per call.
	allow, deny, errored prometheus.Counter
	latency              prometheus.Histogram
}

// NewMetrics registers the metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	decisions := prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "trustmesh_authz_decisions_total",
		Help: "ext_authz decisions, by result: allow, deny, or error (an evaluation error, which denies unless failing open).",
	}, []string{"result"})
	m := &Metrics{
		allow: decisions.WithLabelValues("allow"), deny: decisions.WithLabelValues("deny"), errored: decisions.WithLabelValues("error"),
		latency: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "trustmesh_authz_check_duration_seconds",
			Help:    "Time to decide one ext_authz Check.",
			Buckets: prometheus.ExponentialBuckets(5e-6, 2, 16),
		}),
	}
	reg.MustRegister(decisions, m.latency)
	return m
}

func (m *Metrics) observe(allowed, errored bool, d time.Duration) {
	if m == nil {
		return
	}
	switch {
	case errored:
		m.errored.Inc()
	case allowed:
		m.allow.Inc()
	default:
		m.deny.Inc()
	}
	m.latency.Observe(d.Seconds())
}
