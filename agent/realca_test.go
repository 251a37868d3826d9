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

// bundleFile writes the CA's roots as the agent's bootstrap --ca-bundle.
func (r *realCA) bundleFile(path string) string {
	r.t.Helper()
	b, err := controlplane.TrustBundle(context.Background(), controlplane.DataDir(r.dataDir), "")
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
	tok, err := controlplane.CreateJoinToken(context.Background(), controlplane.DataDir(r.dataDir), ownID.String(), ttl)
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
	// The control plane's refusal log ticks on the clock too.
	const caWaiters = 1

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

	// Renewal at half-life, over mTLS: the join token is spent, so only the
	// certificate can authenticate it.
	e.settle(caWaiters + 1)
	fc.Step(34 * time.Minute)
	second := e.nextSVID(updates).DefaultSVID()
	if serial(second) == serial(first) {
		t.Fatal("no renewal")
	}
	checkSDSCert(t, sdsStream.recvUntil(t, sds.CertificateName)[sds.CertificateName], second)

	// The CA goes down; the next renewal fails and the agent keeps
	// serving the current certificate.
	e.settle(caWaiters + 1)
	ca.stop()
	fc.Step(34 * time.Minute)
	e.settle(2) // rotation and the bundle follower back off
	for range 3 {
		fc.Step(time.Minute)
		e.settle(2)
	}
	if got := fetch(t, cfg.SocketPath); serial(got) != serial(second) {
		t.Fatalf("while the CA is down the agent serves serial %s, want %s", serial(got), serial(second))
	}
	if n := counter(t, cfg.Registry, "trustmesh_agent_rotation_failures_total", rotation.ReasonUnavailable); n < 3 {
		t.Fatalf("ca_unavailable failures %v, want at least 3", n)
	}

	// The CA comes back on the same address and data directory; the
	// renewal goes through.
	startRealCA(t, fc, ca.dataDir, ca.addr)
	fc.Step(time.Minute)
	third := e.nextSVID(updates).DefaultSVID()
	if serial(third) == serial(second) {
		t.Fatal("no renewal after the CA came back")
	}
	checkSDSCert(t, sdsStream.recvUntil(t, sds.CertificateName)[sds.CertificateName], third)
}
