package server

import (
	"crypto/x509"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// Metrics are the CA's Prometheus metrics.
type Metrics struct {
	issued  *prometheus.CounterVec
	refused *prometheus.CounterVec
	latency *prometheus.HistogramVec
}

// NewMetrics registers the CA's metrics with reg. The CA certificates'
// expiry is read from current at every scrape, so it follows rotation.
func NewMetrics(reg prometheus.Registerer, current func() *authority.Material) *Metrics {
	m := &Metrics{
		issued: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_ca_issued_total",
			Help: "Certificates issued, by how the caller authenticated.",
		}, []string{"method"}),
		refused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_ca_refused_total",
			Help: "Certificate requests refused, by reason and gRPC code.",
		}, []string{"reason", "code"}),
		latency: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Name:    "trustmesh_ca_request_duration_seconds",
			Help:    "Time to answer CreateCertificate, by outcome.",
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}, []string{"outcome"}),
	}
	reg.MustRegister(m.issued, m.refused, m.latency, &expiryCollector{current: current})
	return m
}

var expiryDesc = prometheus.NewDesc(
	"trustmesh_ca_certificate_expiry_timestamp_seconds",
	"When each CA certificate in force expires, as a Unix time.",
	[]string{"role", "serial"}, nil)

type expiryCollector struct {
	current func() *authority.Material
}

func (c *expiryCollector) Describe(ch chan<- *prometheus.Desc) { ch <- expiryDesc }

func (c *expiryCollector) Collect(ch chan<- prometheus.Metric) {
	m := c.current()
	emit := func(role string, certs []*x509.Certificate) {
		for _, cert := range certs {
			ch <- prometheus.MustNewConstMetric(expiryDesc, prometheus.GaugeValue,
				float64(cert.NotAfter.Unix()), role, cert.SerialNumber.Text(16))
		}
	}
	emit("intermediate", m.Chain)
	emit("root", m.Roots)
}

func (m *Metrics) observe(outcome string, d time.Duration) {
	m.latency.WithLabelValues(outcome).Observe(d.Seconds())
}
