package decisionlog

import "github.com/prometheus/client_golang/prometheus"

// Metric names of a Logger's counters (Register).
const (
	MetricDropped = "trustmesh_authz_decision_log_dropped_total"
	MetricWritten = "trustmesh_authz_decision_log_written_total"
)

// Register registers the log's counters with reg: the decisions dropped
// because the queue was full (Dropped) and the lines written (Written).
// They are read when scraped; the Check path counts with one atomic add.
func (l *Logger) Register(reg prometheus.Registerer) error {
	for _, c := range []prometheus.Collector{
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: MetricDropped,
			Help: "Decisions not logged because the decision log's queue was full (the writer fell behind); the decision itself was made and answered.",
		}, func() float64 { return float64(l.Dropped()) }),
		prometheus.NewCounterFunc(prometheus.CounterOpts{
			Name: MetricWritten,
			Help: "Decision log lines written.",
		}, func() float64 { return float64(l.Written()) }),
	} {
		if err := reg.Register(c); err != nil {
			return err
		}
	}
	return nil
}
