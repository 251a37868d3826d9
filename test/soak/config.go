package main

import (
	"errors"
	"flag"
	"fmt"
	"time"
)

// config is one soak's shape. Every duration is wall-clock time: the soak
// runs real processes, whose clocks it cannot step.
type config struct {
	Duration time.Duration
	// Agents is the number of `trustmesh agent` processes, the workloads of
	// the gRPC and probe pairs included.
	Agents int
	// Pairs of proxyless gRPC workloads, and Probes pairs of mTLS
	// handshake workloads; each pair takes two of the agents.
	Pairs, Probes int
	// CertTTL is the workload certificates' lifetime (serve's minimum and
	// default, and what every agent asks for).
	CertTTL time.Duration
	// PolicyEvery is how often the policies are rewritten; Propagation is
	// how long after a rewrite a call may still be decided under the
	// policy before it (calls started in that window are not judged).
	PolicyEvery, Propagation time.Duration
	// RotateEvery is one intermediate rotation: --prepare half way,
	// --activate at its end. Zero turns rotation off.
	RotateEvery time.Duration
	// ReloadInterval is how long serve may take to apply a rotation made
	// by `trustmesh ca rotate` in another process (its rotation check
	// interval, 1m by default).
	ReloadInterval time.Duration
	// ReportEvery is how often a line of figures is printed; Sample how
	// often the cert dirs, Workload API sockets and the control plane are
	// sampled.
	ReportEvery, Sample time.Duration
	// CheckFlat turns the flatness verdict into a pass/fail condition:
	// over the second half of the run, the growth of a linear fit of the
	// control plane's RSS must stay within max(FlatFraction of its mean,
	// FlatRSSFloor), and of its goroutines within max(FlatFraction of
	// their mean, FlatGoroutineFloor).
	CheckFlat          bool
	FlatFraction       float64
	FlatRSSFloor       float64 // bytes
	FlatGoroutineFloor float64
	// Binary is a trustmesh binary to run instead of building one, and
	// AgentBinary a trustmesh-agent binary (the sidecar's: the same agent
	// command in a binary without the control plane).
	Binary, AgentBinary string
	// Keep leaves the work directory (logs, data dir) behind.
	Keep bool
}

func defaultConfig() config {
	return config{
		Duration: 30 * time.Minute, Agents: 200, Pairs: 4, Probes: 2,
		CertTTL: 5 * time.Minute, PolicyEvery: time.Minute, Propagation: 15 * time.Second,
		RotateEvery: 2 * time.Minute, ReloadInterval: time.Minute,
		ReportEvery: time.Minute, Sample: 10 * time.Second,
		CheckFlat: true, FlatFraction: 0.10, FlatRSSFloor: 16 << 20, FlatGoroutineFloor: 50,
	}
}

func (c *config) register(fs *flag.FlagSet) {
	fs.DurationVar(&c.Duration, "duration", c.Duration, "how long the soak runs once every agent has its first certificate")
	fs.IntVar(&c.Agents, "agents", c.Agents, "trustmesh agent processes, the pairs' workloads included")
	fs.IntVar(&c.Pairs, "grpc-pairs", c.Pairs, "proxyless gRPC client/server pairs (two agents each)")
	fs.IntVar(&c.Probes, "probe-pairs", c.Probes, "mTLS handshake probe pairs on agents' Workload API (two agents each)")
	fs.DurationVar(&c.CertTTL, "cert-ttl", c.CertTTL, "workload certificate lifetime")
	fs.DurationVar(&c.PolicyEvery, "policy-every", c.PolicyEvery, "how often the AuthorizationPolicy file is rewritten")
	fs.DurationVar(&c.Propagation, "propagation", c.Propagation, "after a policy rewrite, how long calls are not judged against it")
	fs.DurationVar(&c.RotateEvery, "rotate-every", c.RotateEvery, "one intermediate rotation (prepare half way, activate at the end); 0 turns it off")
	fs.DurationVar(&c.ReloadInterval, "reload-interval", c.ReloadInterval, "serve's rotation check interval: how long it may take to apply a rotation")
	fs.DurationVar(&c.ReportEvery, "report-every", c.ReportEvery, "how often figures are printed")
	fs.DurationVar(&c.Sample, "sample", c.Sample, "how often cert dirs, Workload API sockets and the control plane are sampled")
	fs.BoolVar(&c.CheckFlat, "check-flat", c.CheckFlat, "fail when the control plane's RSS or goroutines grow over the second half")
	fs.Float64Var(&c.FlatFraction, "flat-fraction", c.FlatFraction, "growth allowed over the second half, as a fraction of the mean")
	fs.Float64Var(&c.FlatRSSFloor, "flat-rss-floor", c.FlatRSSFloor, "RSS growth (bytes) always allowed over the second half")
	fs.Float64Var(&c.FlatGoroutineFloor, "flat-goroutine-floor", c.FlatGoroutineFloor, "goroutine growth always allowed over the second half")
	fs.StringVar(&c.Binary, "binary", "", "trustmesh binary to run (default: build ./cmd/trustmesh)")
	fs.StringVar(&c.AgentBinary, "agent-binary", "", "trustmesh-agent binary the agents run (default: build ./cmd/trustmesh-agent)")
	fs.BoolVar(&c.Keep, "keep", false, "keep the work directory (data dir, logs)")
}

// validate collects every problem with c.
func (c *config) validate() error {
	var errs []error
	for _, d := range []struct {
		name string
		v    time.Duration
	}{
		{"-duration", c.Duration}, {"-cert-ttl", c.CertTTL}, {"-policy-every", c.PolicyEvery},
		{"-propagation", c.Propagation}, {"-reload-interval", c.ReloadInterval},
		{"-report-every", c.ReportEvery}, {"-sample", c.Sample},
	} {
		if d.v <= 0 {
			errs = append(errs, fmt.Errorf("%s %s must be positive", d.name, d.v))
		}
	}
	if c.RotateEvery < 0 {
		errs = append(errs, fmt.Errorf("-rotate-every %s must not be negative", c.RotateEvery))
	}
	if c.Propagation >= c.PolicyEvery {
		errs = append(errs, fmt.Errorf("-propagation %s must be shorter than -policy-every %s, or no call is ever judged", c.Propagation, c.PolicyEvery))
	}
	if c.Pairs < 1 || c.Probes < 1 {
		errs = append(errs, fmt.Errorf("-grpc-pairs %d and -probe-pairs %d must be at least 1", c.Pairs, c.Probes))
	}
	if need := 2 * (c.Pairs + c.Probes); c.Agents < need {
		errs = append(errs, fmt.Errorf("-agents %d is fewer than the %d the pairs need", c.Agents, need))
	}
	if c.FlatFraction < 0 || c.FlatRSSFloor < 0 || c.FlatGoroutineFloor < 0 {
		errs = append(errs, errors.New("the flatness thresholds must not be negative"))
	}
	return errors.Join(errs...)
}
