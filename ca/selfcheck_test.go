package ca_test

import (
	"context"
	"crypto"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"crypto/x509/pkix"
	"io"
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
	return issuingMaterial(t, func(inter *x509.Certificate) { inter.PermittedURIDomains = []string{permitted} })
}

// issuingMaterial is a root and an intermediate under it, the intermediate's
// template changed by shape first.
func issuingMaterial(t *testing.T, shape func(inter *x509.Certificate)) *authority.Material {
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
	shape(interTmpl)
	inter := mk(interTmpl, root, interKey.Public(), rootKey)
	return &authority.Material{Signer: interKey, Cert: inter, Chain: []*x509.Certificate{inter},
		Roots: []*x509.Certificate{root}, Anchor: root}
}

// misbehavingSigner is an issuing key gone wrong, as a broken KMS or HSM
// backend might be.
type misbehavingSigner struct {
	// reports is what Public() says; after is what it says once Sign has
	// been called, when set.
	reports, after crypto.PublicKey
	// signs is the key that actually signs; nil returns garbage.
	signs  crypto.Signer
	signed atomic.Bool
}

func (s *misbehavingSigner) Public() crypto.PublicKey {
	if s.after != nil && s.signed.Load() {
		return s.after
	}
	return s.reports
}

func (s *misbehavingSigner) Sign(r io.Reader, digest []byte, opts crypto.SignerOpts) ([]byte, error) {
	s.signed.Store(true)
	if s.signs == nil {
		return []byte("not a signature"), nil
	}
	return s.signs.Sign(r, digest, opts)
}

// The self-check does not verify the leaf's signature itself: it relies on
// x509.CreateCertificate verifying it under the issuing certificate's key
// (ca.go, issuerSigner). Every way an issuing key can misbehave must still
// end in a refusal, with nothing journalled and no certificate returned.
// This also holds Go to that check: a crypto/x509 that stopped verifying
// what a signer returns would fail it.
func TestSignerMisbehaving(t *testing.T) {
	f := newFixture(t)
	ctx := context.Background()
	m := f.auth.Current()
	other := ecKey(t, elliptic.P256())
	// An intermediate whose basic constraints say it is no CA, although
	// its key usage allows certificate signing: only its CA bit is wrong.
	notCA := issuingMaterial(t, func(inter *x509.Certificate) { inter.IsCA = false })
	for _, tc := range []struct {
		name string
		m    authority.Material
	}{
		{"signs with another key and says so", withSigner(m, &misbehavingSigner{reports: other.Public(), signs: other})},
		{"says it is the issuing key but signs with another", withSigner(m, &misbehavingSigner{reports: m.Cert.PublicKey, signs: other})},
		{"says it is the issuing key until it has signed with another", withSigner(m, &misbehavingSigner{reports: m.Cert.PublicKey, after: other.Public(), signs: other})},
		{"returns garbage", withSigner(m, &misbehavingSigner{reports: m.Cert.PublicKey})},
		{"the issuing certificate is no CA", *notCA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			a := &swappableAuthority{m: &tc.m}
			a.bundle.Store(x509bundle.FromX509Authorities(td, tc.m.Roots))
			c, err := ca.New(ca.Config{TrustDomain: td, Authority: a, Recorder: f.store, Clock: f.clock})
			if err != nil {
				t.Fatal(err)
			}
			before, err := f.store.Size(ctx)
			if err != nil {
				t.Fatal(err)
			}
			got, err := c.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0)
			r, ok := ca.AsRefusal(err)
			if !ok || r.Kind != ca.KindInternal || (r.Reason != ca.ReasonSignFailed && r.Reason != ca.ReasonSelfCheckFailed) || got != nil {
				t.Fatalf("Issue() = %v, %v; want a sign or self-check refusal and no certificate", got, err)
			}
			if after, err := f.store.Size(ctx); err != nil || after != before {
				t.Fatalf("journal size %d, %v after the refusal; want %d", after, err, before)
			}
		})
	}
	// The same CA with the material's own key issues.
	if _, err := f.ca.Issue(ctx, caller, makeCSR(t, csrOpts{}), 0); err != nil {
		t.Fatal(err)
	}
}

func withSigner(m *authority.Material, s crypto.Signer) authority.Material {
	c := *m
	c.Signer = s
	return c
}
