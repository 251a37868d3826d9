package ca_test

import (
	"context"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca"
)

// TestBackdate: workload certificates become valid Backdate before they
// are issued, 30s unless configured, and a negative backdate is refused.
func TestBackdate(t *testing.T) {
	f := newFixture(t)
	for _, tc := range []struct {
		backdate, want time.Duration
	}{
		{0, ca.DefaultBackdate},
		{5 * time.Second, 5 * time.Second},
	} {
		c, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: f.store, Clock: f.clock,
			MinTTL: 20 * time.Second, DefaultTTL: 20 * time.Second, MaxTTL: 20 * time.Second, Backdate: tc.backdate})
		if err != nil {
			t.Fatal(err)
		}
		iss, err := c.Issue(context.Background(), caller, makeCSR(t, csrOpts{}), 0)
		if err != nil {
			t.Fatal(err)
		}
		now := f.clock.Now()
		if got := now.Sub(iss.Leaf.NotBefore); got != tc.want {
			t.Errorf("Backdate %s: valid from %s before issuance, want %s", tc.backdate, got, tc.want)
		}
		if got := iss.Leaf.NotAfter.Sub(now); got != 20*time.Second {
			t.Errorf("Backdate %s: valid until %s after issuance, want 20s", tc.backdate, got)
		}
	}
	if _, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: f.store, Backdate: -time.Second}); err == nil {
		t.Error("a negative backdate was accepted")
	}
}
