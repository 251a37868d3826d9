package ca_test

import (
	"context"
	"crypto"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
)

// swappableAuthority serves one generation of material with a bundle the
// test replaces on its own, as a rotation that drops a root does while the
// same material is still current for a moment.
type swappableAuthority struct {
	m      *authority.Material
	bundle atomic.Pointer[x509bundle.Bundle]
}

func (a *swappableAuthority) Current() *authority.Material { return a.m }

func (a *swappableAuthority) GetX509BundleForTrustDomain(spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return a.bundle.Load(), nil
}

// The self-check verifies the issuing chain once per generation, but it
// must still refuse to hand out a certificate once the root that chain ends
// at has left the bundle: the verification it remembers is of a chain to
// that root.
func TestSelfCheckRefusesOnceTheRootLeavesTheBundle(t *testing.T) {
	f := newFixture(t)
	m := f.auth.Current()
	a := &swappableAuthority{m: m}
	a.bundle.Store(x509bundle.FromX509Authorities(td, m.Roots))
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: a, Recorder: f.store, Clock: f.clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if _, err := c.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0); err != nil {
		t.Fatal(err)
	}
	other, err := authority.Generate(ctx, td, t0, 0)
	if err != nil {
		t.Fatal(err)
	}
	a.bundle.Store(x509bundle.FromX509Authorities(td, other.Roots))
	got, err := c.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0)
	if r, ok := ca.AsRefusal(err); !ok || r.Reason != ca.ReasonSelfCheckFailed || got != nil {
		t.Fatalf("Issue() after the root left the bundle = %v, %v; want a self-check refusal", got, err)
	}
	// Back in the bundle, the same generation issues again.
	a.bundle.Store(x509bundle.FromX509Authorities(td, m.Roots))
	if _, err := c.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0); err != nil {
		t.Fatal(err)
	}
}

// An operator's intermediate may carry name constraints. They bind the
// leaves it signs, so the self-check must apply them to every leaf, not only
// check the leaf's signature under a chain it verified once.
func TestSelfCheckAppliesTheChainsNameConstraints(t *testing.T) {
	f := newFixture(t)
	m := constrainedMaterial(t, "other.example")
	a := &swappableAuthority{m: m}
	a.bundle.Store(x509bundle.FromX509Authorities(td, m.Roots))
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: a, Recorder: f.store, Clock: f.clock})
	if err != nil {
		t.Fatal(err)
	}
	got, err := c.Issue(context.Background(), caller, makeCSR(t, csrOpts{}), 0)
	if r, ok := ca.AsRefusal(err); !ok || r.Reason != ca.ReasonSelfCheckFailed || got != nil {
		t.Fatalf("Issue() under an intermediate that excludes %s = %v, %v; want a self-check refusal", td, got, err)
	}
	// The same chain constrained to the trust domain issues.
	a2 := &swappableAuthority{m: constrainedMaterial(t, td.Name())}
	a2.bundle.Store(x509bundle.FromX509Authorities(td, a2.m.Roots))
	c2, err := ca.New(ca.Config{TrustDomain: td, Authority: a2, Recorder: f.store, Clock: f.clock})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c2.Issue(context.Background(), caller, makeCSR(t, csrOpts{}), 0); err != nil {
		t.Fatal(err)
	}
}

// constrainedMaterial is a root and an intermediate under it whose URI SANs
// are constrained to host permitted.
func constrainedMaterial(t *testing.T, permitted string) *authority.Material {
	t.Helper()
	mk := func(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) *x509.Certificate {
		der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
		if err != nil {
			t.Fatal(err)
		}
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		return cert
	}
	rootKey, interKey := ecKey(t, elliptic.P256()), ecKey(t, elliptic.P256())
	base := func(serial int64, cn string) *x509.Certificate {
		return &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			URIs: []*url.URL{td.ID().URL()}, NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(48 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	}
	rootTmpl := base(1, "constrained test root")
	root := mk(rootTmpl, rootTmpl, rootKey.Public(), rootKey)
	interTmpl := base(2, "constrained test intermediate")
	interTmpl.PermittedURIDomains = []string{permitted}
	inter := mk(interTmpl, root, interKey.Public(), rootKey)
	return &authority.Material{Signer: interKey, Cert: inter, Chain: []*x509.Certificate{inter},
		Roots: []*x509.Certificate{root}, Anchor: root}
}
