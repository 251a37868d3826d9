package journal

import (
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// Metric names of the journal's own figures.
const (
	MetricAppendSeconds   = "trustmesh_journal_append_seconds"
	MetricCommitBatchSize = "trustmesh_journal_commit_batch_size"
)

// metrics are the journal's histograms. They always exist; a Store is a
// prometheus.Collector, so that whoever serves metrics registers it where
// it registers the CA's.
type metrics struct {
	appendSeconds prometheus.Histogram
	batchSize     prometheus.Histogram
}

func newMetrics() metrics {
	return metrics{
		appendSeconds: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name: MetricAppendSeconds,
			Help: "Time from an append being submitted to the journal to its durable commit, as the caller (an issuance) waits for it. Appends that fail are not counted.",
			// 0.5 ms to about 4 s.
			Buckets: prometheus.ExponentialBuckets(0.0005, 2, 14),
		}),
		batchSize: prometheus.NewHistogram(prometheus.HistogramOpts{
			Name:    MetricCommitBatchSize,
			Help:    "Appends per committed transaction (group commit): one durable sync and one signed checkpoint each.",
			Buckets: prometheus.ExponentialBuckets(1, 2, 10), // 1 to 512, MaxBatch's default
		}),
	}
}

// Describe implements prometheus.Collector.
func (s *Store) Describe(ch chan<- *prometheus.Desc) {
	s.metrics.appendSeconds.Describe(ch)
	s.metrics.batchSize.Describe(ch)
}

// Collect implements prometheus.Collector.
func (s *Store) Collect(ch chan<- prometheus.Metric) {
	s.metrics.appendSeconds.Collect(ch)
	s.metrics.batchSize.Collect(ch)
}

// observeAppend records one durable append that waited d.
func (m metrics) observeAppend(d time.Duration) { m.appendSeconds.Observe(d.Seconds()) }

// observeBatch records one committed batch of n appends.
func (m metrics) observeBatch(n int) { m.batchSize.Observe(float64(n)) }
