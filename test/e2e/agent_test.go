package e2e

import (
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/rotation"
	"github.com/trustmesh/trustmesh/agent/sds"
	"github.com/trustmesh/trustmesh/controlplane"
)

// TestAgentWithRealCA runs the agent against the real CA in-process: a join
// token enrols it, go-spiffe and SDS clients get its SVID, a renewal driven
// by the fake clock goes over mTLS, and the CA going down at renewal time
// leaves the old certificate in service until the CA is back.
func TestAgentWithRealCA(t *testing.T) {
	ownID := spiffeid.RequireFromString("spiffe://cluster.local/vm/web-1")
	// The control plane and the agent share the fake clock, so that the
	// test can age certificates by stepping it.
	fc := clocktesting.NewFakeClock(time.Now().Truncate(time.Second))
	e := &agentEnv{t: t, clock: fc, dir: tempDir(t)}
	ca := startControlPlane(t, filepath.Join(e.dir, "ca"), func(c *controlplane.Config) { c.Clock = fc })

	cfg := e.agentConfig(ca, "web-1", ownID, 10*time.Minute)
	e.startAgent(cfg)

	updates := watch(t, cfg.SocketPath)
	first := e.nextSVID(updates, ownID).DefaultSVID()
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
	advanceUntil(t, fc, 2*time.Minute, 25, "renewal", func() bool { return len(updates) > 0 })
	second := e.nextSVID(updates, ownID).DefaultSVID()
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
	advanceUntil(t, fc, 2*time.Minute, 30, "three failed renewals", func() bool { return failures() >= 3 })
	if got := fetch(t, cfg.SocketPath); serial(got) != serial(second) {
		t.Fatalf("while the CA is down the agent serves serial %s, want %s", serial(got), serial(second))
	}
	if len(updates) > 0 {
		t.Fatal("workload got an update while the CA was down")
	}

	// The CA comes back on the same address and data directory; the
	// renewal goes through.
	ca.restart()
	advanceUntil(t, fc, time.Minute, 5, "renewal after the CA came back", func() bool { return len(updates) > 0 })
	third := e.nextSVID(updates, ownID).DefaultSVID()
	if serial(third) == serial(second) {
		t.Fatal("no renewal after the CA came back")
	}
	checkSDSCert(t, sdsStream.recvUntil(t, sds.CertificateName)[sds.CertificateName], third)
}
