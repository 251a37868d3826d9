package main

import (
	"bufio"
	"fmt"
	"io"
	"math"
	"sort"
	"strconv"
	"strings"
	"time"
)

// point is one sample of a series, at an offset from the soak's start.
type point struct {
	at time.Duration
	v  float64
}

// flatness is the verdict on a series: the growth of its least-squares
// line over the second half of the run, against the allowance.
type flatness struct {
	samples         int
	mean, growth    float64 // growth: slope × the second half's span
	allowed         float64
	flat, undecided bool
}

// judgeFlat fits a line to the points of the second half of the run
// (at >= span/2) and calls the series flat when the line's growth over
// that half is at most max(fraction × mean, floor). Fewer than four points
// leave it undecided.
func judgeFlat(ps []point, span time.Duration, fraction, floor float64) flatness {
	var half []point
	for _, p := range ps {
		if p.at >= span/2 {
			half = append(half, p)
		}
	}
	f := flatness{samples: len(half)}
	if len(half) < 4 {
		f.undecided = true
		return f
	}
	var sx, sy, sxx, sxy float64
	for _, p := range half {
		x := p.at.Seconds()
		sx, sy, sxx, sxy = sx+x, sy+p.v, sxx+x*x, sxy+x*p.v
	}
	n := float64(len(half))
	f.mean = sy / n
	den := n*sxx - sx*sx
	slope := 0.0
	if den != 0 {
		slope = (n*sxy - sx*sy) / den
	}
	f.growth = slope * (half[len(half)-1].at - half[0].at).Seconds()
	f.allowed = math.Max(fraction*f.mean, floor)
	f.flat = f.growth <= f.allowed
	return f
}

func (f flatness) String(unit func(float64) string) string {
	if f.undecided {
		return fmt.Sprintf("undecided (%d samples in the second half, 4 needed)", f.samples)
	}
	verdict := "FLAT"
	if !f.flat {
		verdict = "GROWING"
	}
	return fmt.Sprintf("%s: fitted growth over the second half %s (allowed %s; mean %s; %d samples)",
		verdict, unit(f.growth), unit(f.allowed), unit(f.mean), f.samples)
}

func mib(v float64) string   { return fmt.Sprintf("%.1f MiB", v/(1<<20)) }
func count(v float64) string { return fmt.Sprintf("%.0f", v) }

// metrics is a Prometheus text exposition: every sample by its name and
// its labels as written ({a="b",c="d"} or "").
type metrics map[string]map[string]float64

// parseMetrics reads the text format; comments and malformed lines are
// skipped (the soak reads a few known families, nothing else).
func parseMetrics(r io.Reader) (metrics, error) {
	m := metrics{}
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 4<<20)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || line[0] == '#' {
			continue
		}
		name, labels := line, ""
		if i := strings.IndexByte(line, '{'); i >= 0 {
			j := strings.LastIndexByte(line, '}')
			if j < i {
				continue
			}
			name, labels, line = line[:i], line[i:j+1], strings.TrimSpace(line[j+1:])
		} else {
			k := strings.IndexAny(line, " \t")
			if k < 0 {
				continue
			}
			name, line = line[:k], strings.TrimSpace(line[k:])
		}
		val := line
		if k := strings.IndexAny(line, " \t"); k >= 0 {
			val = line[:k] // a timestamp follows
		}
		v, err := strconv.ParseFloat(val, 64)
		if err != nil {
			continue
		}
		if m[name] == nil {
			m[name] = map[string]float64{}
		}
		m[name][labels] = v
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("soak: reading metrics: %w", err)
	}
	return m, nil
}

// sum adds every sample of name whose labels contain each of match
// (`key="value"` strings).
func (m metrics) sum(name string, match ...string) float64 {
	var s float64
	for labels, v := range m[name] {
		if containsAll(labels, match) {
			s += v
		}
	}
	return s
}

func containsAll(labels string, match []string) bool {
	for _, want := range match {
		if !strings.Contains(labels, want) {
			return false
		}
	}
	return true
}

// histogram is a cumulative Prometheus histogram: counts by upper bound.
type histogram struct {
	bounds []float64 // ascending, +Inf last
	counts []float64
}

// histogramOf reads histogram family name (without _bucket) from m,
// summing the series whose labels contain each of match.
func (m metrics) histogramOf(name string, match ...string) histogram {
	byLE := map[float64]float64{}
	for labels, v := range m[name+"_bucket"] {
		if !containsAll(labels, match) {
			continue
		}
		i := strings.Index(labels, `le="`)
		if i < 0 {
			continue
		}
		rest := labels[i+4:]
		le, err := strconv.ParseFloat(rest[:strings.IndexByte(rest, '"')], 64)
		if err != nil {
			continue
		}
		byLE[le] += v
	}
	var h histogram
	for le := range byLE {
		h.bounds = append(h.bounds, le)
	}
	sort.Float64s(h.bounds)
	for _, le := range h.bounds {
		h.counts = append(h.counts, byLE[le])
	}
	return h
}

// minus is h's observations since an earlier reading of the same family.
func (h histogram) minus(earlier histogram) histogram {
	out := histogram{bounds: h.bounds, counts: make([]float64, len(h.counts))}
	prev := map[float64]float64{}
	for i, le := range earlier.bounds {
		prev[le] = earlier.counts[i]
	}
	for i, le := range h.bounds {
		out.counts[i] = h.counts[i] - prev[le]
	}
	return out
}

func (h histogram) total() float64 {
	if len(h.counts) == 0 {
		return 0
	}
	return h.counts[len(h.counts)-1]
}

// quantile is the upper bound of the bucket holding quantile q: a bound
// on it, not an interpolation, since buckets double. Past the last finite
// bound it returns +Inf.
func (h histogram) quantile(q float64) float64 {
	n := h.total()
	if n == 0 {
		return math.NaN()
	}
	rank := q * n
	for i, c := range h.counts {
		if c >= rank {
			return h.bounds[i]
		}
	}
	return math.Inf(1)
}

func seconds(v float64) string {
	switch {
	case math.IsNaN(v):
		return "-"
	case math.IsInf(v, 1):
		return "+Inf"
	}
	return (time.Duration(v * float64(time.Second))).String()
}
