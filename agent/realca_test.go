package agent

import (
	"context"
	"encoding/pem"
	"log/slog"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/rotation"
	"github.com/trustmesh/trustmesh/agent/sds"
	"github.com/trustmesh/trustmesh/controlplane"
)

// realCA is trustmesh's control plane run in-process on loopback, sharing
// the agent's fake clock, so that a test can age certificates by stepping
// the clock and take the CA down and bring it back on the same address and
// data directory.
type realCA struct {
	t       *testing.T
	clock   *clocktesting.FakeClock
	dataDir string
	addr    string
	stop    func()
}

func startRealCA(t *testing.T, fc *clocktesting.FakeClock, dataDir, listen string) *realCA {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cp, err := controlplane.New(ctx, controlplane.Config{
		DataDir:          dataDir,
		ListenCA:         listen,
		ListenMonitoring: "127.0.0.1:0",
		Kubernetes:       controlplane.KubernetesOff,
		Clock:            fc,
		Log:              slog.New(slog.NewTextHandler(testWriter{t}, nil)).With("component", "controlplane"),
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cp.Run(ctx) }()
	r := &realCA{t: t, clock: fc, dataDir: dataDir, addr: cp.Addrs().CA.String()}
	stopped := false
	r.stop = func() {
		if stopped {
			return
		}
		stopped = true
		cancel()
		if err := <-done; err != nil {
			t.Errorf("control plane Run: %v", err)
		}
	}
	t.Cleanup(r.stop)
	return r
}

// advanceUntil steps the fake clock by step, at most max times, until cond
// holds, giving the agent a moment to act after each step.
func (e *env) advanceUntil(step time.Duration, max int, what string, cond func() bool) {
	e.t.Helper()
	for i := 0; ; i++ {
		deadline := time.Now().Add(200 * time.Millisecond)
		for time.Now().Before(deadline) {
			if cond() {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		if i == max {
			e.t.Fatalf("no %s after advancing the clock %d times by %s", what, max, step)
		}
		e.clock.Step(step)
	}
}

// bundleFile writes the CA's roots as the agent's bootstrap --ca-bundle.
func (r *realCA) bundleFile(path string) string {
	r.t.Helper()
	b, err := controlplane.TrustBundle(context.Background(), controlplane.DataDir(r.dataDir), controlplane.JournalOptions{}, "")
	if err != nil {
		r.t.Fatal(err)
	}
	var out []byte
	for _, c := range b.X509Authorities() {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		r.t.Fatal(err)
	}
	return path
}

func (r *realCA) joinToken(ttl time.Duration) string {
	r.t.Helper()
	tok, err := controlplane.CreateJoinToken(context.Background(), controlplane.DataDir(r.dataDir), controlplane.JournalOptions{}, ownID.String(), ttl)
	if err != nil {
		r.t.Fatal(err)
	}
	return tok
}

// TestAgentWithRealCA runs the agent against the real CA in-process: a join
// token enrols it, go-spiffe and SDS clients get its SVID, a renewal driven
// by the fake clock goes over mTLS, and the CA going down at renewal time
// leaves the old certificate in service until the CA is back.
func TestAgentWithRealCA(t *testing.T) {
	fc := clocktesting.NewFakeClock(time.Now().Truncate(time.Second))
	dir, err := os.MkdirTemp("", "agent")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	ca := startRealCA(t, fc, filepath.Join(dir, "ca"), "127.0.0.1:0")

	cfg := Config{
		CAAddress:    ca.addr,
		CABundleFile: ca.bundleFile(filepath.Join(dir, "ca.pem")),
		JoinToken:    ca.joinToken(10 * time.Minute),
		SocketPath:   filepath.Join(dir, "agent.sock"),
		CertTTL:      time.Hour,
		Clock:        fc,
		Logger:       slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registry:     prometheus.NewRegistry(),
	}
	e := &env{t: t, clock: fc, dir: dir}
	e.start(cfg)

	updates := watch(t, cfg.SocketPath)
	first := e.nextSVID(updates).DefaultSVID()
	if got := first.Certificates[0].NotAfter.Sub(first.Certificates[0].NotBefore); got > time.Hour+time.Minute {
		t.Fatalf("certificate lives %s, asked for 1h", got)
	}
	sdsStream := newSDS(t, cfg.SocketPath)
	got := sdsStream.recvUntil(t, sds.CertificateName, sds.RootCAName)
	checkSDSCert(t, got[sds.CertificateName], first)

	// The CA's own loops wait on the shared clock too, so instead of
	// counting waiters the clock is advanced in steps until the agent acts.
	// Renewal at half-life, over mTLS: the join token is spent, so only the
	// certificate can authenticate it.
	e.advanceUntil(2*time.Minute, 25, "renewal", func() bool { return len(updates) > 0 })
	second := e.nextSVID(updates).DefaultSVID()
	if serial(second) == serial(first) {
		t.Fatal("no renewal")
	}
	checkSDSCert(t, sdsStream.recvUntil(t, sds.CertificateName)[sds.CertificateName], second)

	// The CA goes down; renewals fail and the agent keeps serving the
	// current certificate.
	ca.stop()
	failures := func() float64 {
		return counter(t, cfg.Registry, "trustmesh_agent_rotation_failures_total", rotation.ReasonUnavailable)
	}
	e.advanceUntil(2*time.Minute, 30, "three failed renewals", func() bool { return failures() >= 3 })
	if got := fetch(t, cfg.SocketPath); serial(got) != serial(second) {
		t.Fatalf("while the CA is down the agent serves serial %s, want %s", serial(got), serial(second))
	}
	if len(updates) > 0 {
		t.Fatal("workload got an update while the CA was down")
	}

	// The CA comes back on the same address and data directory; the
	// renewal goes through.
	startRealCA(t, fc, ca.dataDir, ca.addr)
	e.advanceUntil(time.Minute, 5, "renewal after the CA came back", func() bool { return len(updates) > 0 })
	third := e.nextSVID(updates).DefaultSVID()
	if serial(third) == serial(second) {
		t.Fatal("no renewal after the CA came back")
	}
	checkSDSCert(t, sdsStream.recvUntil(t, sds.CertificateName)[sds.CertificateName], third)
}
