package audit_test

import (
	"context"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// TestRotationReportClock: a forward jump (an issuance dated after every
// certificate issued before it had expired) is a warning, a gap shorter
// than that is not, and a certificate valid after its issuer ends is
// critical.
func TestRotationReportClock(t *testing.T) {
	s := openJournal(t)
	t0 := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	issue(t, s, "spiffe://cluster.local/ns/a/sa/a", t0, time.Hour, journal.OriginKubernetes)
	issue(t, s, "spiffe://cluster.local/ns/a/sa/a", t0.Add(50*time.Minute), time.Hour, journal.OriginKubernetes) // a quiet gap, certificates live
	jumped := issue(t, s, "spiffe://cluster.local/ns/a/sa/a", t0.Add(50*time.Minute+time.Hour+time.Second), time.Hour, journal.OriginKubernetes)
	at := t0.Add(3 * time.Hour)
	issuerEnd := t0.Add(2*time.Hour + 30*time.Minute) // the last certificate ends at 2h50m
	rep, err := audit.Rotation(context.Background(), s, []audit.CACert{{Role: "intermediate", Serial: "1", NotAfter: issuerEnd, State: "active"}}, at, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := map[string][]string{}
	for _, f := range rep.Findings {
		got[f.Kind] = append(got[f.Kind], f.Subject)
	}
	if f := got["clock-jump-forward"]; len(f) != 1 || f[0] != "issuance "+jumped {
		t.Errorf("clock-jump-forward findings %v, want one for issuance %s", f, jumped)
	}
	if f := got["outlives-issuer"]; len(f) != 1 || f[0] != "issuance "+jumped {
		t.Errorf("outlives-issuer findings %v, want one for issuance %s", f, jumped)
	}
}
