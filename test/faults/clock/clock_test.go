// Package clock_test jumps the CA's injected clock backwards and forwards
// while agents renew, in process: the clock cannot be moved from outside a
// running trustmesh without moving the machine's.
package clock_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/svid"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/internal/serial"
)

var (
	td = spiffeid.RequireTrustDomainFromString("cluster.local")
	t0 = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
)

const ttl = 10 * time.Minute

// agent renews its certificate at half-life, as the real agent does
// (without jitter), and re-enrols by its token once it has none valid.
type agent struct {
	id   spiffeid.ID
	cert *x509.Certificate
}

type mesh struct {
	t      *testing.T
	ca     *ca.CA
	clock  *clocktesting.FakeClock
	store  *journal.Store
	auth   *authority.Authority
	agents []*agent
	// refused counts refusals by reason; issued counts certificates.
	refused map[string]int
	issued  int
}

func newMesh(t *testing.T, agents int) *mesh {
	t.Helper()
	ctx := context.Background()
	m, err := authority.Generate(ctx, td, t0, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, ckey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, _, err := journal.NewCheckpointSigner("trustmesh.journal/test", ckey)
	if err != nil {
		t.Fatal(err)
	}
	store, err := journal.Open(ctx, journal.Config{DSN: filepath.Join(t.TempDir(), "journal.db"), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	// Start an hour after the intermediate was minted.
	fc := clocktesting.NewFakeClock(t0.Add(time.Hour))
	auth := authority.New(td, m)
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: auth, Recorder: store, Clock: fc,
		MinTTL: time.Minute, DefaultTTL: ttl, MaxTTL: ttl})
	if err != nil {
		t.Fatal(err)
	}
	ms := &mesh{t: t, ca: c, clock: fc, store: store, auth: auth, refused: map[string]int{}}
	for i := range agents {
		ms.agents = append(ms.agents, &agent{id: spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/shop/sa/a%d", i))})
	}
	return ms
}

// tick lets every agent due for renewal (or without a valid certificate)
// ask the CA, as the agent's rotation loop would at this moment.
func (ms *mesh) tick() {
	ms.t.Helper()
	now := ms.clock.Now()
	for _, a := range ms.agents {
		if a.cert != nil && now.Before(a.cert.NotBefore.Add(a.cert.NotAfter.Sub(a.cert.NotBefore)/2)) && now.Before(a.cert.NotAfter) {
			continue
		}
		key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		if err != nil {
			ms.t.Fatal(err)
		}
		csr, err := svid.NewCSR(key, a.id)
		if err != nil {
			ms.t.Fatal(err)
		}
		caller := ca.Caller{ID: a.id, Method: "kubernetes", Subject: "system:serviceaccount:shop:" + a.id.Path(), Origin: journal.OriginKubernetes}
		iss, err := ms.ca.Issue(context.Background(), caller, csr, 0)
		if err != nil {
			r, ok := ca.AsRefusal(err)
			if !ok || r.Kind != ca.KindUnavailable {
				ms.t.Fatalf("at %s, %s: %v; want only Unavailable refusals", now, a.id, err)
			}
			ms.refused[r.Reason]++
			continue
		}
		a.cert = iss.Leaf
		ms.issued++
	}
}

// run ticks every 30 s for d.
func (ms *mesh) run(d time.Duration) {
	for end := ms.clock.Now().Add(d); ms.clock.Now().Before(end); ms.clock.Step(30 * time.Second) {
		ms.tick()
	}
}

// TestClockJumps: backwards beyond the allowance the CA signs nothing
// (Unavailable, saying why) until its clock is back in bounds; forwards by
// an hour it signs, and the rotation audit reports the jump; nothing in the
// journal is ever valid outside its issuer's validity.
func TestClockJumps(t *testing.T) {
	ms := newMesh(t, 5)
	ms.run(30 * time.Minute)
	if ms.issued < 5*4 {
		t.Fatalf("%d certificates in 30 minutes of 10-minute certificates for 5 agents", ms.issued)
	}
	latest := ms.clock.Now()

	// Backwards by an hour: every renewal is refused for the clock.
	ms.clock.SetTime(latest.Add(-time.Hour))
	before := ms.issued
	for _, a := range ms.agents {
		a.cert = nil // all ask at once
	}
	ms.run(10 * time.Minute)
	if ms.issued != before {
		t.Fatalf("%d certificates signed by a clock an hour behind the journal", ms.issued-before)
	}
	if ms.refused[ca.ReasonClockBehind] < 5*20 {
		t.Fatalf("refusals %v; want every attempt refused with %s", ms.refused, ca.ReasonClockBehind)
	}
	_, err := ms.ca.Issue(context.Background(), ca.Caller{ID: ms.agents[0].id, Method: "kubernetes", Origin: journal.OriginKubernetes},
		mustCSR(t, ms.agents[0].id), 0)
	if err == nil || !strings.Contains(err.Error(), "behind the journal's latest issuance") {
		t.Fatalf("refusal %v does not say why", err)
	}

	// Back within the allowance: issuing resumes.
	ms.clock.SetTime(latest.Add(-ca.DefaultMaxClockSkew + time.Minute))
	ms.run(10 * time.Minute)
	if ms.issued < before+5 {
		t.Fatalf("%d certificates after the clock came back; want every agent re-issued", ms.issued-before)
	}

	// Forwards by an hour: the CA signs, agents whose certificates expired
	// re-enrol.
	before = ms.issued
	ms.clock.Step(time.Hour)
	ms.run(10 * time.Minute)
	if ms.issued < before+5 {
		t.Fatalf("%d certificates after the forward jump; want every agent re-issued", ms.issued-before)
	}

	// Nothing outside its issuer's validity, over the whole journal.
	ctx := context.Background()
	issuer := ms.auth.Current().Cert
	entries, err := ms.store.Entries(ctx, 0, 100000)
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for _, e := range entries {
		rec, err := e.Decode()
		if err != nil {
			t.Fatal(err)
		}
		iss, ok := rec.(*journal.Issuance)
		if !ok {
			continue
		}
		n++
		if iss.Issuer != serial.Format(issuer.SerialNumber) {
			t.Fatalf("issuance %s names issuer %s, want %s", iss.Serial, iss.Issuer, serial.Format(issuer.SerialNumber))
		}
		if iss.NotBefore.Before(issuer.NotBefore) || iss.NotAfter.After(issuer.NotAfter) {
			t.Errorf("issuance %s valid %s to %s, outside its issuer's %s to %s", iss.Serial, iss.NotBefore, iss.NotAfter, issuer.NotBefore, issuer.NotAfter)
		}
	}
	if n != ms.issued {
		t.Fatalf("%d issuances in the journal, %d certificates returned", n, ms.issued)
	}

	// The rotation audit reports the jump, once.
	rep, err := audit.Rotation(ctx, ms.store, []audit.CACert{{Role: "intermediate", Serial: serial.Format(issuer.SerialNumber),
		NotAfter: issuer.NotAfter, State: "active"}}, ms.clock.Now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	var jumps []audit.Finding
	for _, f := range rep.Findings {
		switch f.Kind {
		case "clock-jump-forward":
			jumps = append(jumps, f)
		case "outlives-issuer":
			t.Errorf("audit: %+v", f)
		}
	}
	if len(jumps) != 1 {
		t.Fatalf("audit reports %d forward jumps %+v; want 1", len(jumps), jumps)
	}
	t.Logf("issued %d, refused %v; audit: %s", ms.issued, ms.refused, jumps[0].Detail)
}

func mustCSR(t *testing.T, id spiffeid.ID) []byte {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	csr, err := svid.NewCSR(key, id)
	if err != nil {
		t.Fatal(err)
	}
	return csr
}
