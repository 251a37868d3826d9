package main

import (
	"bytes"
	"context"
	"errors"
	"math"
	"os"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"

	"github.com/trustmesh/trustmesh/test/leakcheck"
)

// TestMain fails a passing run that leaves goroutines of the soak's own
// code running. grpc-go keeps the pemfile watchers of its xDS bootstraps,
// so library goroutines are not counted.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		code = leakcheck.CheckOurs(os.Stderr)
	}
	os.Exit(code)
}

// quickConfig is the soak at the scale of make test: ten agents on
// one-minute certificates (renewed about 15 s after issue: a minute less
// the CA's 30 s backdate, halved), two gRPC pairs, one probe pair,
// policies rewritten every 8 s and an intermediate prepared and activated
// every 12 s, for 30 s. 30 s is too short to judge growth: flatness is
// printed, not asserted.
func quickConfig() config {
	c := defaultConfig()
	c.Duration, c.Agents, c.Pairs, c.Probes = 30*time.Second, 10, 2, 1
	c.CertTTL, c.PolicyEvery, c.Propagation, c.RotateEvery = time.Minute, 8*time.Second, 4*time.Second, 12*time.Second
	c.ReportEvery, c.Sample, c.CheckFlat = 10*time.Second, 2*time.Second, false
	return c
}

// TestSoakQuick runs the harness itself: the real binaries, built here,
// on loopback. Every must-be-zero figure must be zero, and the figures
// must show that what the soak claims to exercise happened.
func TestSoakQuick(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs trustmesh serve and 10 agents for 30 s")
	}
	cfg := quickConfig()
	if err := cfg.validate(); err != nil {
		t.Fatal(err)
	}
	var out bytes.Buffer
	res, err := run(context.Background(), cfg, &out)
	t.Logf("soak output:\n%s", out.String())
	if err != nil {
		t.Fatal(err)
	}
	if f := res.failures(); len(f) > 0 {
		t.Fatalf("the soak failed:\n%s", strings.Join(f, "\n"))
	}
	for _, c := range []struct {
		what string
		ok   bool
	}{
		{"agents renewed", res.renewals > 0},
		{"gRPC calls were allowed and denied", res.traffic.ok > 0 && res.traffic.denied > 0},
		{"calls were judged against the policy in force", res.traffic.calls > res.traffic.unjudged},
		{"probe handshakes were made", res.traffic.handshakes > 0},
		{"an intermediate was activated", res.activated >= 1},
		{"the journal holds an entry per certificate issued", res.journalEntries >= res.issued && res.issued >= float64(cfg.Agents)},
		{"the control plane was sampled", len(res.rss) >= 4 && len(res.goroutines) >= 4},
		{"the journal's size on disk was measured", res.journalBytes > 0},
		{"the CA exports the journal's append latency", res.journalLatencyName == "trustmesh_journal_append_seconds"},
		{"every issuance was timed as a journal append", res.journalLatency.total() >= res.issued && res.issued > 0},
		{"journal append p50 <= p99 <= p99.9, all positive", saneQuantiles(res.journalLatency)},
	} {
		if !c.ok {
			t.Errorf("%s: no", c.what)
		}
	}
}

// TestJudgeFlat: a flat or shrinking series is flat, a growing one is not,
// within the allowance max(fraction × mean, floor), and too few samples
// leave the verdict undecided.
func TestJudgeFlat(t *testing.T) {
	series := func(n int, f func(i int) float64) []point {
		ps := make([]point, n)
		for i := range ps {
			ps[i] = point{at: time.Duration(i) * 10 * time.Second, v: f(i)}
		}
		return ps
	}
	const span = 19 * 10 * time.Second // 20 samples; the second half is 10
	for _, tc := range []struct {
		name      string
		ps        []point
		flat      bool
		undecided bool
	}{
		{name: "constant", ps: series(20, func(int) float64 { return 100 }), flat: true},
		{name: "noisy around a level", ps: series(20, func(i int) float64 { return 100 + float64(i%3) }), flat: true},
		{name: "grew in the first half only", ps: series(20, func(i int) float64 { return float64(min(i, 9)) * 50 }), flat: true},
		{name: "shrinking", ps: series(20, func(i int) float64 { return 1000 - float64(i) }), flat: true},
		{name: "growing 2 a sample (18 over the half, mean ~129, allowed 12.9)", ps: series(20, func(i int) float64 { return 100 + 2*float64(i) }), flat: false},
		{name: "three samples", ps: series(3, func(int) float64 { return 1 }), undecided: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := judgeFlat(tc.ps, span, 0.10, 1)
			if f.undecided != tc.undecided || (!tc.undecided && f.flat != tc.flat) {
				t.Fatalf("judgeFlat = %+v, want flat %v undecided %v", f, tc.flat, tc.undecided)
			}
		})
	}
}

// TestJudge: a call decided against the policy in force is counted wrong,
// unless it started within the propagation window of a rewrite or a
// rewrite came while it ran; failures are counted apart.
func TestJudge(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	pc := &policyClock{}
	pc.record(t0, 0)                  // phase 0: pair 0 allowed, pair 1 denied
	pc.record(t0.Add(time.Minute), 1) // phase 1: pair 0 denied, pair 1 allowed
	const window = 10 * time.Second
	at := func(d time.Duration) time.Time { return t0.Add(d) }
	for _, tc := range []struct {
		name                  string
		pair                  int
		start, end            time.Duration
		code                  codes.Code
		wrong, unjudged, fail int
	}{
		{name: "allowed as phase 0 says", pair: 0, start: 20 * time.Second, end: 21 * time.Second, code: codes.OK},
		{name: "allowed against phase 0", pair: 1, start: 20 * time.Second, end: 21 * time.Second, code: codes.OK, wrong: 1},
		{name: "denied against phase 0", pair: 0, start: 20 * time.Second, end: 21 * time.Second, code: codes.PermissionDenied, wrong: 1},
		{name: "old decision within the window", pair: 0, start: 65 * time.Second, end: 66 * time.Second, code: codes.OK, unjudged: 1},
		{name: "old decision past the window", pair: 0, start: 75 * time.Second, end: 76 * time.Second, code: codes.OK, wrong: 1},
		{name: "a rewrite while it ran", pair: 0, start: 59 * time.Second, end: 61 * time.Second, code: codes.PermissionDenied, unjudged: 1},
		{name: "before any policy", pair: 0, start: -time.Second, end: 0, code: codes.OK, unjudged: 1},
		{name: "failed", pair: 0, start: 20 * time.Second, end: 21 * time.Second, code: codes.Unavailable, fail: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := &counts{}
			converged := -1
			judge(tc.pair, at(tc.start), at(tc.end), tc.code, errors.New(tc.code.String()), pc, window, &converged, c)
			if c.wrong != tc.wrong || c.unjudged != tc.unjudged || c.callFailed != tc.fail || c.calls != 1 {
				t.Fatalf("wrong %d unjudged %d failed %d calls %d, want %d %d %d 1", c.wrong, c.unjudged, c.callFailed, c.calls, tc.wrong, tc.unjudged, tc.fail)
			}
		})
	}
}

// TestMetrics reads counters and a histogram from the text format, and
// bounds quantiles by bucket.
func TestMetrics(t *testing.T) {
	m, err := parseMetrics(strings.NewReader(`# HELP go_goroutines Number of goroutines.
# TYPE go_goroutines gauge
go_goroutines 42
trustmesh_ca_refused_total{code="PermissionDenied",reason="token"} 2
trustmesh_ca_refused_total{code="Unavailable",reason="journal"} 3
trustmesh_ca_request_duration_seconds_bucket{outcome="issued",le="0.001"} 50
trustmesh_ca_request_duration_seconds_bucket{outcome="issued",le="0.002"} 98
trustmesh_ca_request_duration_seconds_bucket{outcome="issued",le="0.004"} 100
trustmesh_ca_request_duration_seconds_bucket{outcome="issued",le="+Inf"} 100
trustmesh_ca_request_duration_seconds_bucket{outcome="refused",le="+Inf"} 5
`))
	if err != nil {
		t.Fatal(err)
	}
	if g := m["go_goroutines"][""]; g != 42 {
		t.Errorf("go_goroutines = %v, want 42", g)
	}
	if r := m.sum("trustmesh_ca_refused_total"); r != 5 {
		t.Errorf("refused = %v, want 5", r)
	}
	h := m.histogramOf("trustmesh_ca_request_duration_seconds", `outcome="issued"`)
	if q := h.quantile(0.5); q != 0.001 {
		t.Errorf("p50 <= %v, want 0.001", q)
	}
	if q := h.quantile(0.99); q != 0.004 {
		t.Errorf("p99 <= %v, want 0.004", q)
	}
	earlier := histogram{bounds: h.bounds, counts: []float64{50, 50, 50, 50}}
	if d := h.minus(earlier); d.total() != 50 || d.quantile(0.5) != 0.002 {
		t.Errorf("since earlier: %d observations, p50 <= %v; want 50, 0.002", int(d.total()), d.quantile(0.5))
	}
}

// saneQuantiles: the histogram's p50, p99 and p99.9 are defined, positive
// and in order (an append slower than the last bucket gives +Inf).
func saneQuantiles(h histogram) bool {
	p50, p99, p999 := h.quantile(0.5), h.quantile(0.99), h.quantile(0.999)
	return !math.IsNaN(p50) && p50 > 0 && p50 <= p99 && p99 <= p999
}
