package node

import (
	"context"
	"crypto/x509"
	"log/slog"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	"github.com/trustmesh/trustmesh/agent/svid"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// ownCA issues what is asked, or issueAs instead when set.
type ownCA struct {
	ca      *testca.Authority
	clk     *clocktesting.FakeClock
	mu      sync.Mutex
	asked   []string
	issueAs spiffeid.ID
}

func (o *ownCA) FetchEntries(context.Context) (*cav1.FetchEntriesResponse, error) { return nil, nil }

func (o *ownCA) BatchNewX509SVID(_ context.Context, ps []*cav1.NewX509SVIDParams) ([]*cav1.NewX509SVIDResult, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	var out []*cav1.NewX509SVIDResult
	for _, p := range ps {
		o.asked = append(o.asked, p.GetSpiffeId())
		csr, err := x509.ParseCertificateRequest(p.GetCsr())
		if err != nil {
			return nil, err
		}
		id := spiffeid.RequireFromString(p.GetSpiffeId())
		if !o.issueAs.IsZero() {
			id = o.issueAs
		}
		chain, err := o.ca.Issue(csr.PublicKey, id, o.clk.Now(), time.Hour)
		if err != nil {
			return nil, err
		}
		r := &cav1.NewX509SVIDResult{Code: int32(codes.OK)}
		for _, c := range chain[:2] {
			r.CertChain = append(r.CertChain, c.Raw)
		}
		out = append(out, r)
	}
	return out, nil
}

func (o *ownCA) count() int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return len(o.asked)
}

func newOwn(t *testing.T, as spiffeid.ID) (*ownNodeSVID, *ownCA, *clocktesting.FakeClock) {
	now := time.Now()
	clk := clocktesting.NewFakeClock(now)
	ca := &ownCA{ca: testca.New(t, td, now.Add(-time.Minute)), clk: clk, issueAs: as}
	b := identity.New()
	b.SetBundle(ca.ca.Bundle())
	return &ownNodeSVID{ca: ca, bundle: b, name: "node-a", keyType: svid.ECP256, clock: clk,
		backoff: backoff.Backoff{Initial: time.Second, Max: time.Second}, log: slog.New(slog.DiscardHandler), store: identity.New()}, ca, clk
}

func TestOwnNodeSVIDIssuedAndRenewedAtHalfLife(t *testing.T) {
	n, ca, clk := newOwn(t, spiffeid.ID{})
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- n.Run(ctx) }()
	defer func() { cancel(); <-done }()
	waitUntil(t, func() bool { s, _ := n.store.Load(); return s.SVID != nil })
	s, _ := n.store.Load()
	if want := "spiffe://" + td.Name() + "/node/node-a"; s.SVID.ID.String() != want || ca.asked[0] != want {
		t.Fatalf("got %s (asked %v), want %s", s.SVID.ID, ca.asked, want)
	}
	first := s.SVID
	waitUntil(t, func() bool { return clk.HasWaiters() })
	clk.Step(29 * time.Minute)
	time.Sleep(50 * time.Millisecond)
	if ca.count() != 1 {
		t.Fatalf("asked again before half its lifetime (%d calls)", ca.count())
	}
	clk.Step(2 * time.Minute)
	waitUntil(t, func() bool { s, _ := n.store.Load(); return s.SVID != first })
}

func TestOwnNodeSVIDOfAnotherIDRefused(t *testing.T) {
	n, _, _ := newOwn(t, spiffeid.RequireFromString("spiffe://"+td.Name()+"/node/node-b"))
	if _, err := n.issue(context.Background()); err == nil {
		t.Fatal("a certificate for another node was accepted as this node's")
	}
	if s, _ := n.store.Load(); s.SVID != nil {
		t.Fatal("a refused certificate was stored")
	}
}

func waitUntil(t *testing.T, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(5 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatal("timed out")
		}
		time.Sleep(10 * time.Millisecond)
	}
}
