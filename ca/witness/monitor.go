package witness

import (
	"bytes"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"sort"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// Finding is a history a log showed that contradicts itself or what the
// witness accepted.
type Finding struct {
	// Kind is KindRollback, KindFork, KindSplitView or "bad-signature".
	Kind   string `json:"kind"`
	Origin string `json:"origin"`
	// Sources are the sources that showed it.
	Sources []string `json:"sources"`
	Size    uint64   `json:"size"`
	Detail  string   `json:"detail"`
	// Evidence are the files the refused checkpoints were kept in.
	Evidence []string `json:"evidence,omitempty"`
}

// Observation is what one source showed in a round.
type Observation struct {
	Source   string `json:"source"`
	Size     uint64 `json:"size"`
	Root     string `json:"root,omitempty"` // base64, as in the checkpoint
	Accepted bool   `json:"accepted"`
	Error    string `json:"error,omitempty"`
}

// Report is the result of one round.
type Report struct {
	Origin       string        `json:"origin"`
	Accepted     uint64        `json:"accepted_size"`
	Observations []Observation `json:"observations"`
	Findings     []Finding     `json:"findings"`
}

// Unreachable reports whether a source could not be read or its answer
// not checked.
func (r *Report) Unreachable() bool {
	for _, o := range r.Observations {
		if o.Error != "" {
			return true
		}
	}
	return false
}

// Monitor reads a log from its sources and offers what they show to the
// witness.
type Monitor struct {
	W       *Witness
	Origin  string
	Sources []Source
	Metrics *Metrics // may be nil
}

type seen struct {
	src    Source
	signed []byte
	cp     journal.Checkpoint
	obs    int // index in Report.Observations
}

// Once reads every source once: it refuses a split view (two sources
// showing different trees of the same size), then offers the checkpoints
// to the witness from the smallest, each with a consistency proof from the
// witness's latest accepted size fetched from the same source.
func (m *Monitor) Once(ctx context.Context) *Report {
	rep := &Report{Origin: m.Origin, Findings: []Finding{}}
	var got []seen
	for _, src := range m.Sources {
		rep.Observations = append(rep.Observations, Observation{Source: src.Name()})
		o := &rep.Observations[len(rep.Observations)-1]
		signed, err := src.Checkpoint(ctx)
		if err == nil {
			var cp journal.Checkpoint
			if cp, err = m.W.check(signed, m.Origin); err == nil {
				o.Size, o.Root = cp.Size, base64.StdEncoding.EncodeToString(cp.Root)
				got = append(got, seen{src, signed, cp, len(rep.Observations) - 1})
				continue
			}
			if errors.Is(err, ErrBadSignature) {
				rep.Findings = append(rep.Findings, Finding{Kind: "bad-signature", Origin: m.Origin, Sources: []string{src.Name()},
					Detail: err.Error(), Evidence: m.W.evidence(m.Origin, "bad-signature", signed)})
			}
		}
		o.Error = err.Error()
		m.Metrics.sourceError()
	}

	// A split view: different trees of one size from different sources.
	sort.SliceStable(got, func(i, j int) bool { return got[i].cp.Size < got[j].cp.Size })
	split := map[uint64]bool{}
	for i := 1; i < len(got); i++ {
		a, b := got[i-1], got[i]
		if a.cp.Size == b.cp.Size && !bytes.Equal(a.cp.Root, b.cp.Root) && !split[a.cp.Size] {
			split[a.cp.Size] = true
			f := Finding{Kind: KindSplitView, Origin: m.Origin, Size: a.cp.Size,
				Detail: fmt.Sprintf("two different trees of size %d", a.cp.Size)}
			for _, s := range got {
				if s.cp.Size == a.cp.Size {
					f.Sources = append(f.Sources, s.src.Name())
					f.Evidence = append(f.Evidence, m.W.evidence(m.Origin, KindSplitView, s.signed)...)
				}
			}
			rep.Findings = append(rep.Findings, f)
		}
	}

	for _, s := range got {
		if split[s.cp.Size] {
			continue
		}
		o := &rep.Observations[s.obs]
		latest, _ := m.W.Latest(m.Origin)
		var p [][]byte
		if s.cp.Size > latest.Size && latest.Size > 0 {
			var err error
			if p, err = s.src.Consistency(ctx, latest.Size, s.cp.Size); err != nil {
				// A source that cannot prove its tree extends the accepted
				// one: unreachable, or a fork it will not show. Not
				// accepted either way.
				o.Error = err.Error()
				m.Metrics.sourceError()
				continue
			}
		}
		_, err := m.W.Add(s.signed, latest.Size, p)
		var refused *RefusedError
		switch {
		case err == nil:
			o.Accepted = true
		case errors.As(err, &refused):
			f := Finding{Kind: refused.Kind, Origin: m.Origin, Sources: []string{s.src.Name()}, Size: s.cp.Size, Detail: refused.Detail}
			if refused.Evidence != "" {
				f.Evidence = []string{refused.Evidence}
			}
			rep.Findings = append(rep.Findings, f)
		default:
			o.Error = err.Error()
			m.Metrics.sourceError()
		}
	}
	latest, _ := m.W.Latest(m.Origin)
	rep.Accepted = latest.Size
	m.Metrics.round(rep)
	return rep
}

// check verifies signed as a checkpoint of origin.
func (w *Witness) check(signed []byte, origin string) (journal.Checkpoint, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	l, cp, err := w.open(signed)
	if err != nil {
		return journal.Checkpoint{}, err
	}
	if l.origin != origin {
		return journal.Checkpoint{}, fmt.Errorf("%w: a checkpoint of %s, not %s", ErrUnknownLog, l.origin, origin)
	}
	return cp, nil
}

// evidence keeps signed as evidence for origin's log.
func (w *Witness) evidence(origin, kind string, signed []byte) []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	l, ok := w.logs[origin]
	if !ok {
		return nil
	}
	if p := w.keepEvidence(l, kind, signed); p != "" {
		return []string{p}
	}
	return nil
}

// Metrics count what a continuous monitor saw.
type Metrics struct {
	findings     *prometheus.CounterVec
	sourceErrors prometheus.Counter
	rounds       prometheus.Counter
	accepted     *prometheus.GaugeVec
}

// NewMetrics registers the monitor's metrics with reg.
func NewMetrics(reg prometheus.Registerer) *Metrics {
	m := &Metrics{
		findings: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "trustmesh_witness_findings_total",
			Help: "Checkpoints the witness refused, by kind: rollback, fork, split-view, bad-signature."}, []string{"kind"}),
		sourceErrors: prometheus.NewCounter(prometheus.CounterOpts{Name: "trustmesh_witness_source_errors_total",
			Help: "Reads of a source that failed or could not be checked."}),
		rounds: prometheus.NewCounter(prometheus.CounterOpts{Name: "trustmesh_witness_rounds_total",
			Help: "Rounds of reading every source."}),
		accepted: prometheus.NewGaugeVec(prometheus.GaugeOpts{Name: "trustmesh_witness_accepted_size",
			Help: "Size of the latest checkpoint the witness accepted, by log origin."}, []string{"origin"}),
	}
	for _, k := range []string{KindRollback, KindFork, KindSplitView, "bad-signature"} {
		m.findings.WithLabelValues(k)
	}
	reg.MustRegister(m.findings, m.sourceErrors, m.rounds, m.accepted)
	return m
}

func (m *Metrics) sourceError() {
	if m != nil {
		m.sourceErrors.Inc()
	}
}

func (m *Metrics) round(rep *Report) {
	if m == nil {
		return
	}
	m.rounds.Inc()
	for _, f := range rep.Findings {
		m.findings.WithLabelValues(f.Kind).Inc()
	}
	m.accepted.WithLabelValues(rep.Origin).Set(float64(rep.Accepted))
}
