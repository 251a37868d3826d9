package ca_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca"
)

// TestClockBehindJournal: a CA whose clock steps back behind the journal's
// latest issuance by more than DefaultMaxClockSkew refuses to sign, with
// KindUnavailable and a message that says how far behind and behind what,
// until the clock is within bounds again. Steps back within the allowance
// are accepted, and several such steps cannot walk the bound back.
func TestClockBehindJournal(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	// Well after the intermediate was minted (at t0), so that only the
	// journal bounds the clock.
	t1 := t0.Add(time.Hour)
	f.clock.SetTime(t1)
	issue := func() error {
		_, err := f.ca.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0)
		return err
	}
	if err := issue(); err != nil {
		t.Fatalf("issue at t1: %v", err)
	}
	wantBehind := func(what string) {
		t.Helper()
		err := issue()
		r, ok := ca.AsRefusal(err)
		if !ok || r.Kind != ca.KindUnavailable || r.Reason != ca.ReasonClockBehind {
			t.Fatalf("%s: got %v, want an unavailable %s refusal", what, err, ca.ReasonClockBehind)
		}
		if !strings.Contains(err.Error(), "behind the journal's latest issuance at "+t1.Format(time.RFC3339Nano)) {
			t.Errorf("%s: the refusal does not say what the clock is behind: %v", what, err)
		}
	}
	// Within the allowance: signs.
	f.clock.SetTime(t1.Add(-4 * time.Minute))
	if err := issue(); err != nil {
		t.Fatalf("4 minutes back, within the allowance: %v", err)
	}
	// A second step, within the allowance of the last issuance but not of
	// the latest: refused.
	f.clock.SetTime(t1.Add(-ca.DefaultMaxClockSkew - time.Second))
	wantBehind("two steps back")
	// An hour back: refused, however often it is asked.
	f.clock.SetTime(t1.Add(-time.Hour))
	for range 3 {
		wantBehind("an hour back")
	}
	// The clock comes back within bounds: signs again.
	f.clock.SetTime(t1.Add(-ca.DefaultMaxClockSkew))
	if err := issue(); err != nil {
		t.Fatalf("back within the allowance: %v", err)
	}
}

// TestClockBeforeIssuer: a certificate never starts before its issuing
// certificate. A clock behind the moment the intermediate was minted, by
// more than the CA certificates' backdate less the workloads', is refused
// (KindUnavailable); at the bound the certificate starts exactly when its
// issuer does.
func TestClockBeforeIssuer(t *testing.T) {
	f := newFixture(t)
	issuerStart := f.auth.Current().Cert.NotBefore
	f.clock.SetTime(issuerStart.Add(ca.DefaultBackdate - time.Second))
	_, err := f.ca.Issue(context.Background(), caller, makeCSR(t, csrOpts{}), 0)
	if r, ok := ca.AsRefusal(err); !ok || r.Kind != ca.KindUnavailable || r.Reason != ca.ReasonClockBeforeIssuer {
		t.Fatalf("a second too early: got %v, want an unavailable %s refusal", err, ca.ReasonClockBeforeIssuer)
	}
	f.clock.SetTime(issuerStart.Add(ca.DefaultBackdate))
	iss, err := f.ca.Issue(context.Background(), caller, makeCSR(t, csrOpts{}), 0)
	if err != nil {
		t.Fatal(err)
	}
	if iss.Leaf.NotBefore.Before(issuerStart) {
		t.Errorf("the certificate starts at %s, before its issuer at %s", iss.Leaf.NotBefore, issuerStart)
	}
}

// TestClockSkewAllowanceIsConfigured: Config.MaxClockSkew (serve's
// --ca-max-clock-skew) replaces the default allowance, and a negative one
// is refused.
func TestClockSkewAllowanceIsConfigured(t *testing.T) {
	f := newFixture(t)
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: f.store, Clock: f.clock, MaxClockSkew: time.Minute})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t1 := t0.Add(time.Hour)
	f.clock.SetTime(t1)
	if _, err := c.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0); err != nil {
		t.Fatalf("issue at t1: %v", err)
	}
	// Two minutes back is within the default allowance but not this one.
	f.clock.SetTime(t1.Add(-2 * time.Minute))
	_, err = c.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0)
	if r, ok := ca.AsRefusal(err); !ok || r.Reason != ca.ReasonClockBehind {
		t.Fatalf("two minutes back with a one-minute allowance: got %v, want a %s refusal", err, ca.ReasonClockBehind)
	}
	if _, err := f.ca.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0); err != nil {
		t.Fatalf("the default allowance takes two minutes back: %v", err)
	}
	if _, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: f.store, Clock: f.clock, MaxClockSkew: -time.Second}); err == nil {
		t.Fatal("a negative allowance was accepted")
	}
}
