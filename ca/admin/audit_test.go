package admin_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/rotation"
)

// caEnv is a CA as serve assembles it on a data directory, on a fake clock,
// without the servers around it: the admin API reads what it leaves behind.
type caEnv struct {
	t     *testing.T
	dir   admin.DataDir
	clock *clocktesting.FakeClock
	auth  *authority.Authority
	ca    *ca.CA
}

func newCAEnv(t *testing.T, interLife time.Duration) *caEnv {
	t.Helper()
	ctx := context.Background()
	dir := admin.DataDir(t.TempDir())
	clk := clocktesting.NewFakeClock(time.Now())
	store, td, err := dir.OpenJournal(ctx, "cluster.local", admin.JournalOptions{}, false)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	rot, err := rotation.New(rotation.Config{Dir: dir.CADir(), TrustDomain: td, Recorder: store, Clock: clk, IntermediateLifetime: interLife})
	if err != nil {
		t.Fatal(err)
	}
	mat, err := rot.Initial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	auth := authority.New(td, mat)
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: auth, Recorder: store, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	return &caEnv{t: t, dir: dir, clock: clk, auth: auth, ca: c}
}

// issue mints a certificate for id as a join (first) or a renewal.
func (e *caEnv) issue(id spiffeid.ID, renewal bool) {
	e.t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		e.t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		e.t.Fatal(err)
	}
	caller := ca.Caller{ID: id, Method: "join-token", Subject: "token", Origin: journal.OriginJoinToken}
	if renewal {
		caller.Method = "x509-renewal"
	}
	if _, err := e.ca.Issue(context.Background(), caller, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), 0); err != nil {
		e.t.Fatal(err)
	}
}

// TestRotationAuditOverAWeek runs a week on the fake clock: three workloads
// renew at half-life; one stops after two days. The rotation audit finds
// that workload and the intermediate nearing its end.
func TestRotationAuditOverAWeek(t *testing.T) {
	ctx := context.Background()
	e := newCAEnv(t, 8*24*time.Hour)
	type wl struct {
		id   spiffeid.ID
		stop time.Time
	}
	begin := e.clock.Now()
	var wls []*wl
	for i, name := range []string{"web", "api", "batch"} {
		w := &wl{id: spiffeid.RequireFromString("spiffe://cluster.local/vm/" + name)}
		if i == 2 {
			w.stop = begin.Add(48 * time.Hour)
		}
		e.issue(w.id, false)
		wls = append(wls, w)
	}
	for e.clock.Now().Before(begin.Add(7 * 24 * time.Hour)) {
		e.clock.Step(30 * time.Minute) // certificates live 1h: renew at half-life
		for _, w := range wls {
			if w.stop.IsZero() || e.clock.Now().Before(w.stop) {
				e.issue(w.id, true)
			}
		}
	}
	rep, err := admin.AuditRotation(ctx, e.dir, admin.JournalOptions{}, e.clock.Now(), 48*time.Hour)
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
	inter := e.auth.Current().Cert
	late, err := admin.AuditRotation(ctx, e.dir, admin.JournalOptions{}, inter.NotAfter.Add(time.Hour), 48*time.Hour)
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
	if _, err := admin.AuditRotation(ctx, e.dir, admin.JournalOptions{}, begin.Add(-24*time.Hour), 48*time.Hour); err != nil {
		t.Fatalf("audit as of before the CA existed: %v", err)
	}
}
