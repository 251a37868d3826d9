package authn_test

import (
	"context"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
)

// A client chain that verified once is not verified again on every renewal
// of a kept connection, but what it was verified against still decides: once
// its root leaves the bundle, or once a certificate of it expires, the same
// chain is refused as it would be on its first use.
func TestRenewalRechecksARememberedChain(t *testing.T) {
	f := newCAFixture(t)
	ctx := context.Background()
	chain := f.enrol(t, workload)
	// Enrolments outlive the certificate here, so that only the chain's
	// own validity can refuse it at the end.
	r := &authn.Renewal{TrustDomain: td, Bundle: f.auth, Store: f.store, MaxEnrolmentAge: 24 * time.Hour, Clock: f.clock}
	for range 2 {
		if _, err := r.Authenticate(ctx, chain); err != nil {
			t.Fatal(err)
		}
	}
	old := f.auth.Current()
	next, err := authority.Generate(ctx, td, f.clock.Now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	f.auth.Replace(next)
	_, err = r.Authenticate(ctx, chain)
	refusedFor(t, err, ca.ReasonCertInvalid)

	f.auth.Replace(old)
	if _, err := r.Authenticate(ctx, chain); err != nil {
		t.Fatalf("back under its root: %v", err)
	}
	f.clock.SetTime(chain[0].NotAfter.Add(time.Second))
	_, err = r.Authenticate(ctx, chain)
	refusedFor(t, err, ca.ReasonCertInvalid)
}
