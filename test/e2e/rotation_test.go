package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/controlplane"
)

// rotationPlan is the timing of the rotation suite, on the real clock.
type rotationPlan struct {
	// The control plane's rotation policy.
	IntermediateTTL, RootTTL, RootPropagation, Backdate, Interval time.Duration
	// LeafTTL is the agents' certificate lifetime, which is also the
	// CA's minimum and maximum. Backdate applies to leaves too.
	LeafTTL time.Duration
	// IntermediateRotations and RootRotations must each be seen, in the
	// peer chains and in the journal, before the run ends; then the run
	// goes on for a leaf's lifetime, so that certificates under the
	// retired root live out their lives beside the new one.
	IntermediateRotations, RootRotations int
	// Timeout ends a run that has not seen them.
	Timeout time.Duration
	// Pause between the client's exchanges.
	Pause time.Duration
}

// With these numbers an intermediate rotates about every 28s, and a root
// is prepared at 4/5 of its life and activated RootPropagation later.
var rotationSuite = rotationPlan{
	IntermediateTTL:       60 * time.Second,
	RootTTL:               110 * time.Second,
	RootPropagation:       4 * time.Second,
	Backdate:              5 * time.Second,
	Interval:              time.Second,
	LeafTTL:               20 * time.Second,
	IntermediateRotations: 5,
	RootRotations:         2,
	Timeout:               5 * time.Minute,
	Pause:                 50 * time.Millisecond,
}

// TestRotation is the rotation suite, in the spirit of SPIRE's integration
// suites. A control plane rotates its intermediates and roots
// automatically, on short lifetimes and the real clock; two real agents
// enrol with join tokens and renew over the CA's port; two workloads talk
// mTLS continuously with the agents' SVIDs, each verifying the other with
// go-spiffe against the bundle its agent serves.
//
// It asserts, strictly: no exchange fails; no handshake sees a
// certificate outside NotBefore <= now < NotAfter anywhere in the peer's
// chain or its root, on either side; the intermediate and root rotations
// happened, as the peer chains show them and as the journal records them
// (read through the operator API); each new root was in the bundle for
// RootPropagation before it signed, and each retired root stayed in both
// workloads' bundles for at least a leaf's lifetime after it stopped
// signing; the agents renewed throughout, without a lapse the rotation
// audit would report.
func TestRotation(t *testing.T) {
	p := rotationSuite
	start := time.Now()
	dir := tempDir(t)
	cp := startControlPlane(t, filepath.Join(dir, "ca"), func(c *controlplane.Config) {
		c.Rotation = controlplane.RotationConfig{
			IntermediateTTL: p.IntermediateTTL, RootTTL: p.RootTTL, RootPropagation: p.RootPropagation,
			Backdate: p.Backdate, Interval: p.Interval,
		}
		c.CA.MinWorkloadTTL, c.CA.DefaultWorkloadTTL, c.CA.MaxWorkloadTTL = p.LeafTTL, p.LeafTTL, p.LeafTTL
		c.CA.WorkloadBackdate = p.Backdate
	})

	e := &agentEnv{t: t, clock: clock.RealClock{}, dir: dir}
	serverID := spiffeid.RequireFromPath(td, "/ns/shop/sa/server")
	clientID := spiffeid.RequireFromPath(td, "/ns/shop/sa/client")
	sockets := map[string]string{}
	for name, id := range map[string]spiffeid.ID{"server": serverID, "client": clientID} {
		cfg := e.agentConfig(cp, name, id, time.Minute)
		cfg.CertTTL = p.LeafTTL
		e.startAgent(cfg)
		sockets[name] = cfg.SocketPath
	}
	sources := map[string]*workloadapi.X509Source{"server": x509Source(t, sockets["server"]), "client": x509Source(t, sockets["client"])}

	log := newHandshakeLog()
	srv := startMTLSServer(t, sources["server"], clientID, log)
	cli := startMTLSClient(sources["client"], serverID, srv.addr, p.Pause, log)
	bundles := watchBundles(sources, 100*time.Millisecond)
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			cli.stop()
			srv.stop()
			bundles.stop()
		}
	}
	t.Cleanup(stop)

	// Run until the rotations have been seen in the peer chains, and a
	// leaf's lifetime past the last new root.
	deadline := start.Add(p.Timeout)
	for {
		roots, inters, lastRoot := log.counts()
		if roots-1 >= p.RootRotations && inters >= p.IntermediateRotations && time.Since(lastRoot) > p.LeafTTL {
			break
		}
		if time.Now().After(deadline) {
			t.Errorf("after %s the peer chains showed %d root and %d intermediate rotations; want %d and %d",
				p.Timeout, roots-1, inters, p.RootRotations, p.IntermediateRotations)
			break
		}
		time.Sleep(time.Second)
	}
	stop()
	end := time.Now()
	t.Logf("ran %s: %d exchanges, longest gap between them %s, peer chains verified %v",
		end.Sub(start).Round(time.Second), log.exchanges, log.maxGap.Round(time.Millisecond), log.verified)

	// Traffic: every exchange succeeded, none saw a certificate outside
	// its validity, and it flowed throughout.
	for _, f := range first(log.failures, 10) {
		t.Errorf("failed exchange: %s", f)
	}
	if len(log.failures) > 0 {
		t.Errorf("%d failed exchanges", len(log.failures))
	}
	for _, x := range first(log.expired, 10) {
		t.Errorf("certificate outside its validity at handshake: %s", x)
	}
	if len(log.expired) > 0 {
		t.Errorf("%d certificates outside their validity at handshake", len(log.expired))
	}
	if log.verified["server"] == 0 || log.verified["client"] == 0 {
		t.Errorf("peer chains verified %v: both sides must verify", log.verified)
	}
	if log.maxGap > p.LeafTTL {
		t.Errorf("traffic stopped for %s, longer than a certificate's life", log.maxGap)
	}

	// The agents renewed: a leaf lives LeafTTL at most, so each identity
	// presented at least one per LeafTTL of the run.
	for _, id := range []spiffeid.ID{serverID, clientID} {
		if got, want := len(log.leaves[id]), int(end.Sub(start)/p.LeafTTL); got < want {
			t.Errorf("%s presented %d certificates in %s; a renewing agent presents at least %d", id, got, end.Sub(start).Round(time.Second), want)
		}
	}

	// No leaf was cut short to its intermediate's end: each lived
	// LeafTTL from issuance, plus the backdate. A rotation step may come
	// one Interval late.
	var cut []string
	for _, id := range []spiffeid.ID{serverID, clientID} {
		for _, leaf := range log.leaves[id] {
			if short := p.LeafTTL + p.Backdate - leaf.NotAfter.Sub(leaf.NotBefore); short > p.Interval {
				cut = append(cut, fmt.Sprintf("%s cut short by %s: %s", id, short, describe(leaf)))
			}
		}
	}
	for _, c := range first(cut, 10) {
		t.Errorf("leaf %s", c)
	}

	// Rotations, as the peer chains show them.
	roots, inters := byFirstSeen(log.roots), byFirstSeen(log.inters)
	for _, r := range roots {
		t.Logf("root %s seen %s to %s in %d chains", describe(r.cert), r.first.Sub(start).Round(time.Millisecond), r.last.Sub(start).Round(time.Millisecond), r.count)
	}
	for _, i := range inters {
		t.Logf("intermediate %s under root %s seen %s to %s in %d chains", describe(i.cert), i.root, i.first.Sub(start).Round(time.Millisecond), i.last.Sub(start).Round(time.Millisecond), i.count)
	}
	nRoots, nInters, _ := log.counts()
	if nRoots-1 < p.RootRotations || nInters < p.IntermediateRotations {
		t.Errorf("peer chains show %d root and %d intermediate rotations; want at least %d and %d", nRoots-1, nInters, p.RootRotations, p.IntermediateRotations)
	}

	// Rotations, as the journal records them, read as an operator would.
	steps := rotationSteps(t, cp)
	var rootActivations, interActivations int
	prepared := map[string]time.Time{} // root serial → when it was prepared
	journalled := map[string]bool{}    // every CA certificate the journal names
	activeRoot := ""
	activatedAt := map[string]time.Time{} // root serial → when it was activated
	for _, s := range steps {
		journalled[s.serial] = true
		switch {
		case s.step == "prepare" && s.role == "root":
			prepared[s.serial] = s.at
		case s.step == "activate" && s.role == "intermediate":
			interActivations++
		case s.step == "activate" && s.role == "root" && s.serial != activeRoot:
			// Every activation names the root it chains to; a root
			// rotation is one that names a new root.
			if activeRoot != "" || len(prepared) > 0 {
				rootActivations++
				activatedAt[s.serial] = s.at
				if since := s.at.Sub(prepared[s.serial]); prepared[s.serial].IsZero() || since < p.RootPropagation {
					t.Errorf("root %s was activated %s after it was prepared; the policy says %s", s.serial, since, p.RootPropagation)
				}
			}
			activeRoot = s.serial
		}
	}
	t.Logf("journal: %d intermediate activations, of which %d with a new root", interActivations, rootActivations)
	if rootActivations < p.RootRotations || interActivations-rootActivations < p.IntermediateRotations {
		t.Errorf("the journal records %d root and %d intermediate-only rotations; want at least %d and %d",
			rootActivations, interActivations-rootActivations, p.RootRotations, p.IntermediateRotations)
	}
	// Every CA certificate after the first generation that signed a
	// chain is one the journal recorded.
	for _, i := range inters[1:] {
		if !journalled[i.cert.SerialNumber.Text(16)] {
			t.Errorf("intermediate %s signed chains but the journal never recorded it", describe(i.cert))
		}
	}
	for _, r := range roots[1:] {
		if !journalled[r.cert.SerialNumber.Text(16)] {
			t.Errorf("root %s anchored chains but the journal never recorded it", describe(r.cert))
		}
	}

	// Each new root reached both workloads' bundles before a chain under
	// it was presented.
	for _, r := range roots[1:] {
		serial := r.cert.SerialNumber.Text(16)
		for side := range sources {
			if pr := bundles.presenceOf(side, serial); pr == nil || !pr.first.Before(r.first) {
				t.Errorf("root %s anchored a chain at %s before it was in %s's bundle (%+v)", serial, r.first.Format(time.RFC3339Nano), side, pr)
			}
		}
	}

	// Each retired root stayed in both workloads' bundles for at least a
	// leaf's lifetime after its successor was activated: a certificate
	// signed under it just before then still verifies.
	for k := 0; k+1 < len(roots); k++ {
		old := roots[k].cert.SerialNumber.Text(16)
		next := roots[k+1].cert.SerialNumber.Text(16)
		at, ok := activatedAt[next]
		if !ok {
			at = roots[k+1].first
		}
		keepUntil := at.Add(p.LeafTTL)
		if keepUntil.After(end) {
			keepUntil = end
		}
		for side := range sources {
			pr := bundles.presenceOf(side, old)
			switch {
			case pr == nil:
				t.Errorf("%s's bundle never held root %s", side, old)
			case !pr.removed.IsZero() && pr.removed.Before(keepUntil):
				t.Errorf("%s's bundle dropped root %s at %s, %s after its successor signed; the policy keeps it %s",
					side, old, pr.removed.Format(time.RFC3339Nano), pr.removed.Sub(at).Round(time.Millisecond), p.LeafTTL)
			}
		}
	}

	// The rotation audit finds no identity that stopped renewing or
	// lapsed, and none that renewed far more often than at half-life.
	rep, err := admin.AuditRotation(context.Background(), cp.dataDir(), admin.JournalOptions{}, time.Now(), p.LeafTTL)
	if err != nil {
		t.Fatal(err)
	}
	found := map[string]audit.Identity{}
	for _, i := range rep.Identities {
		found[i.SPIFFEID] = i
	}
	for _, id := range []spiffeid.ID{serverID, clientID} {
		i, ok := found[id.String()]
		switch {
		case !ok:
			t.Errorf("the rotation audit does not know %s", id)
		case i.Lapses != 0 || i.Status == "expired" || i.Status == "overdue":
			t.Errorf("the rotation audit reports %s %s with %d lapses after %d renewals", id, i.Status, i.Lapses, i.Renewals)
		case i.Renewals > 4*int(end.Sub(start)/p.LeafTTL)+2:
			t.Errorf("%s renewed %d times in %s: an agent renewing at half-life renews about twice per %s",
				id, i.Renewals, end.Sub(start).Round(time.Second), p.LeafTTL)
		default:
			t.Logf("audit: %s renewed %d times, %d late, status %s", id, i.Renewals, i.LateRenewals, i.Status)
		}
	}
}

// rotationStep is one rotation record of the journal.
type rotationStep struct {
	at                 time.Time
	step, role, serial string
}

// rotationSteps reads the journal's rotation records through the CA's
// operator API, as `trustmesh audit log` does.
func rotationSteps(t *testing.T, cp *controlPlane) []rotationStep {
	t.Helper()
	rows, err := admin.AuditLog(context.Background(), cp.dataDir(), admin.JournalOptions{}, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	var out []rotationStep
	for _, r := range rows {
		if r.Kind != "rotation" {
			continue
		}
		// Detail is "<step> <role> <subject>".
		f := strings.Fields(r.Detail)
		if len(f) < 2 {
			t.Fatalf("rotation record %d has detail %q", r.Index, r.Detail)
		}
		out = append(out, rotationStep{at: r.Time, step: f[0], role: f[1], serial: r.Serial})
	}
	return out
}

func first(s []string, n int) []string {
	if len(s) > n {
		return append(s[:n:n], fmt.Sprintf("… and %d more", len(s)-n))
	}
	return s
}
