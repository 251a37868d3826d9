package server

import (
	"crypto/x509"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
)

// Metrics are the CA's Prometheus metrics: trustmesh's own, and the same
// events under the names istiod's CA exports (Istio's
// security/pkg/server/ca/monitoring.go), so that Istio's dashboards and
// alerts work unchanged. istiod exports those without the istio_ prefix
// and, for counters, without a _total suffix; so does trustmesh.
type Metrics struct {
	issued  *prometheus.CounterVec
	refused *prometheus.CounterVec
	latency *prometheus.HistogramVec

	// The node service (delegated issuance).
	delegated   *prometheus.CounterVec
	batchSize   prometheus.Histogram
	nodeRefused *prometheus.CounterVec

	citadel citadelMetrics
}

// citadelMetrics are istiod's CA counters.
type citadelMetrics struct {
	csr          prometheus.Counter     // every CreateCertificate
	success      prometheus.Counter     // every certificate issued
	authnFailure prometheus.Counter     // the caller is not authenticated, or may not have a certificate
	csrParsing   prometheus.Counter     // the CSR is not one the CA accepts
	idExtraction prometheus.Counter     // the CSR names an identity other than the caller's
	signErr      *prometheus.CounterVec // the CA could not sign, by Istio's error type
}

// Istio's error types for citadel_server_csr_sign_err_count.
const (
	signErrCANotReady   = "CANotReady"
	signErrCertGenError = "CertGenError"
)

// NewMetrics registers the CA's metrics with reg. The CA certificates'
// expiry is read from current at every scrape, so it follows rotation.
func NewMetrics(reg prometheus.Registerer, current func() *authority.Material) *Metrics {
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Name: name, Help: help})
	}
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
		delegated: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_ca_delegated_total",
			Help: "Certificates asked for by node agents on their workloads' behalf, by result: issued, or the refusal's reason.",
		}, []string{"result"}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    "trustmesh_ca_node_batch_size",
			Help:    "Params per BatchNewX509SVID call from node agents.",
			Buckets: []float64{1, 2, 5, 10, 20, 50, 100, 200, 500},
		}),
		nodeRefused: prometheus.NewCounterVec(prometheus.CounterOpts{
			Name: "trustmesh_ca_node_refused_total",
			Help: "Node service calls refused as a whole, by RPC, reason and gRPC code.",
		}, []string{"rpc", "reason", "code"}),
		citadel: citadelMetrics{
			csr: counter("citadel_server_csr_count",
				"The number of CSRs received by the CA (Istio's name; trustmesh_ca_issued_total plus trustmesh_ca_refused_total)."),
			success: counter("citadel_server_success_cert_issuance_count",
				"The number of certificate issuances that have succeeded (Istio's name; see trustmesh_ca_issued_total)."),
			authnFailure: counter("citadel_server_authentication_failure_count",
				"The number of authentication failures (Istio's name; see trustmesh_ca_refused_total)."),
			csrParsing: counter("citadel_server_csr_parsing_err_count",
				"The number of errors occurred when parsing the CSR (Istio's name; see trustmesh_ca_refused_total)."),
			idExtraction: counter("citadel_server_id_extraction_err_count",
				"The number of errors occurred when extracting the ID from CSR (Istio's name; see trustmesh_ca_refused_total)."),
			signErr: prometheus.NewCounterVec(prometheus.CounterOpts{
				Name: "citadel_server_csr_sign_err_count",
				Help: "The number of errors occurred when signing the CSR (Istio's name; see trustmesh_ca_refused_total).",
			}, []string{"error"}),
		},
	}
	c := m.citadel
	// Both error types are exported from the start, at zero, so that a
	// rate() over them is defined before the first failure.
	c.signErr.WithLabelValues(signErrCANotReady)
	c.signErr.WithLabelValues(signErrCertGenError)
	reg.MustRegister(m.issued, m.refused, m.latency, &expiryCollector{current: current},
		m.delegated, m.batchSize, m.nodeRefused,
		c.csr, c.success, c.authnFailure, c.csrParsing, c.idExtraction, c.signErr)
	return m
}

// issue counts a certificate issued to a caller that authenticated by
// method.
func (m *Metrics) issue(method string, d time.Duration) {
	m.issued.WithLabelValues(method).Inc()
	m.citadel.csr.Inc()
	m.citadel.success.Inc()
	m.latency.WithLabelValues("issued").Observe(d.Seconds())
}

// refuse counts a refused request, answered with code.
func (m *Metrics) refuse(r *ca.Refusal, code string, d time.Duration) {
	m.refused.WithLabelValues(r.Reason, code).Inc()
	m.citadel.csr.Inc()
	if c := m.citadel.counterFor(r); c != nil {
		c.Inc()
	}
	m.latency.WithLabelValues("refused").Observe(d.Seconds())
}

// delegatedResult counts one param of a node's batch: "issued" or the
// refusal's reason.
func (m *Metrics) delegatedResult(result string) {
	if m != nil {
		m.delegated.WithLabelValues(result).Inc()
	}
}

// batch counts a BatchNewX509SVID call of n params.
func (m *Metrics) batch(n int) {
	if m != nil {
		m.batchSize.Observe(float64(n))
	}
}

// nodeRefuse counts a node service call refused as a whole.
func (m *Metrics) nodeRefuse(rpc, reason, code string) {
	if m != nil {
		m.nodeRefused.WithLabelValues(rpc, reason, code).Inc()
	}
}

// counterFor is the Istio counter a refusal counts under, as istiod counts
// the same failure. Every refusal counts under exactly one.
func (c citadelMetrics) counterFor(r *ca.Refusal) prometheus.Counter {
	switch r.Kind {
	case ca.KindUnauthenticated, ca.KindDenied:
		// istiod has no authorization step after authentication: a caller
		// that may not have a certificate (revoked, impersonating) fails
		// authentication there.
		return c.authnFailure
	case ca.KindInvalid:
		if r.Reason == ca.ReasonCSRIdentity {
			return c.idExtraction
		}
		return c.csrParsing
	case ca.KindUnavailable:
		if r.Reason == ca.ReasonJournalTampered {
			return c.signErr.WithLabelValues(signErrCANotReady)
		}
		// A dependency of authentication did not answer: TokenReview, or
		// the renewal check.
		return c.authnFailure
	}
	return c.signErr.WithLabelValues(signErrCertGenError)
}

var (
	expiryDesc = prometheus.NewDesc(
		"trustmesh_ca_certificate_expiry_timestamp_seconds",
		"When each CA certificate in force expires, as a Unix time.",
		[]string{"role", "serial"}, nil)
	citadelRootExpiryDesc = prometheus.NewDesc(
		"citadel_server_root_cert_expiry_timestamp",
		"The unix timestamp, in seconds, when the root the issuing chain ends at expires (Istio's name).",
		nil, nil)
	citadelChainExpiryDesc = prometheus.NewDesc(
		"citadel_server_cert_chain_expiry_timestamp",
		"The unix timestamp, in seconds, when the CA's issuing certificate chain expires: its first certificate to expire (Istio's name).",
		nil, nil)
)

type expiryCollector struct {
	current func() *authority.Material
}

func (c *expiryCollector) Describe(ch chan<- *prometheus.Desc) {
	ch <- expiryDesc
	ch <- citadelRootExpiryDesc
	ch <- citadelChainExpiryDesc
}

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

	// istiod exports one root and one chain: those that issue. During a
	// rotation the bundle also holds the next root and the previous one,
	// which the per-certificate metric above shows.
	if m.Anchor != nil {
		ch <- prometheus.MustNewConstMetric(citadelRootExpiryDesc, prometheus.GaugeValue, float64(m.Anchor.NotAfter.Unix()))
	}
	if len(m.Chain) > 0 {
		first := m.Chain[0].NotAfter
		for _, cert := range m.Chain[1:] {
			if cert.NotAfter.Before(first) {
				first = cert.NotAfter
			}
		}
		ch <- prometheus.MustNewConstMetric(citadelChainExpiryDesc, prometheus.GaugeValue, float64(first.Unix()))
	}
}
