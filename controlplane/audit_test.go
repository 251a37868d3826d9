package controlplane_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/controlplane"
)

// TestRotationAuditOverAWeek runs a week on the fake clock: three workloads
// renew at half-life; one stops after two days. The rotation audit finds
// that workload and the intermediate nearing its end.
func TestRotationAuditOverAWeek(t *testing.T) {
	ctx := context.Background()
	e := start(t, func(c *controlplane.Config) {
		c.ManualRotation = true
		c.CAIntermediateTTL = 8 * 24 * time.Hour
	})
	type wl struct {
		id   spiffeid.ID
		c    *client
		stop time.Time
	}
	begin := e.clock.Now()
	var wls []*wl
	for i, name := range []string{"web", "api", "batch"} {
		w := &wl{id: spiffeid.RequireFromString("spiffe://cluster.local/vm/" + name), c: newClient(t)}
		if i == 2 {
			w.stop = begin.Add(48 * time.Hour)
		}
		e.obtain(w.c, e.token(w.id, time.Minute), w.id)
		wls = append(wls, w)
	}
	for e.clock.Now().Before(begin.Add(7 * 24 * time.Hour)) {
		e.clock.Step(30 * time.Minute) // certificates live 1h: renew at half-life
		for _, w := range wls {
			if w.stop.IsZero() || e.clock.Now().Before(w.stop) {
				e.obtain(w.c, "", w.id)
			}
		}
	}
	rep, err := controlplane.AuditRotation(ctx, controlplane.DataDir(e.dataDir), controlplane.JournalOptions{}, e.clock.Now(), 48*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	var stopped, caExpiring bool
	for _, f := range rep.Findings {
		switch {
		case f.Kind == "stopped-renewing" && f.Subject == "spiffe://cluster.local/vm/batch":
			stopped = true
		case f.Kind == "ca-expiring" && strings.HasPrefix(f.Subject, "intermediate"):
			caExpiring = true
		case f.Level >= audit.Warning:
			t.Errorf("unexpected finding %+v", f)
		}
	}
	if !stopped || !caExpiring {
		t.Fatalf("findings %+v; want the batch workload stopped renewing and the intermediate expiring", rep.Findings)
	}
	for _, id := range rep.Identities {
		switch id.SPIFFEID {
		case "spiffe://cluster.local/vm/batch":
			if id.Status != "expired" {
				t.Errorf("batch status %q, want expired", id.Status)
			}
		default:
			if !id.RenewedInTime || id.Renewals < 300 || id.Status != "ok" && id.Status != "due" {
				t.Errorf("%s: %+v; want a week of timely renewals", id.SPIFFEID, id)
			}
		}
	}
	if rep.Worst() != audit.Critical {
		t.Fatalf("worst finding %v, want critical so the audit gates a pipeline", rep.Worst())
	}

	// Audited after the intermediate's end, and before the CA existed, the
	// report still comes: an expired CA is a finding, not an error.
	inter := e.cp.Authority.Current().Cert
	late, err := controlplane.AuditRotation(ctx, controlplane.DataDir(e.dataDir), controlplane.JournalOptions{}, inter.NotAfter.Add(time.Hour), 48*time.Hour)
	if err != nil {
		t.Fatalf("audit after the intermediate expired: %v", err)
	}
	var expired bool
	for _, f := range late.Findings {
		expired = expired || f.Kind == "ca-expired" && strings.HasPrefix(f.Subject, "intermediate")
	}
	if !expired {
		t.Fatalf("findings %+v after the intermediate's end; want it reported expired", late.Findings)
	}
	if _, err := controlplane.AuditRotation(ctx, controlplane.DataDir(e.dataDir), controlplane.JournalOptions{}, begin.Add(-24*time.Hour), 48*time.Hour); err != nil {
		t.Fatalf("audit as of before the CA existed: %v", err)
	}
}
