package authority_test

import (
	"crypto"
	"crypto/x509"
	"fmt"
	"strings"
	"testing"
	"time"

	"go.step.sm/crypto/pemutil"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// TestMint checks every property of the one function that mints trustmesh's
// roots and intermediates, and that each certificate it returns parses back
// and verifies under its parent.
func TestMint(t *testing.T) {
	root, rootKey, err := authority.Mint(authority.MintRequest{TrustDomain: td, Now: t0, Lifetime: 90 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	shortRoot, shortRootKey, err := authority.Mint(authority.MintRequest{TrustDomain: td, Now: t0, Lifetime: time.Hour, Backdate: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name       string
		req        authority.MintRequest
		parent     *x509.Certificate // nil: self-signed
		role       string
		notBefore  time.Time
		notAfter   time.Time
		maxPathLen int // as parsed: -1 is unlimited
	}{
		{name: "root, default backdate", req: authority.MintRequest{Now: t0, Lifetime: 10 * 365 * 24 * time.Hour},
			role: "root", notBefore: t0.Add(-5 * time.Minute), notAfter: t0.Add(10 * 365 * 24 * time.Hour), maxPathLen: -1},
		{name: "root, 5s backdate", req: authority.MintRequest{Now: t0, Lifetime: 3 * time.Minute, Backdate: 5 * time.Second},
			role: "root", notBefore: t0.Add(-5 * time.Second), notAfter: t0.Add(3 * time.Minute), maxPathLen: -1},
		{name: "intermediate, default backdate", req: authority.MintRequest{Parent: root, ParentKey: rootKey, Now: t0.Add(time.Hour), Lifetime: 24 * time.Hour},
			parent: root, role: "intermediate", notBefore: t0.Add(time.Hour - 5*time.Minute), notAfter: t0.Add(25 * time.Hour)},
		{name: "intermediate, 5s backdate", req: authority.MintRequest{Parent: root, ParentKey: rootKey, Now: t0, Lifetime: 60 * time.Second, Backdate: 5 * time.Second},
			parent: root, role: "intermediate", notBefore: t0.Add(-5 * time.Second), notAfter: t0.Add(60 * time.Second)},
		{name: "intermediate clamped to its root", req: authority.MintRequest{Parent: shortRoot, ParentKey: shortRootKey, Now: t0.Add(30 * time.Minute), Lifetime: time.Hour, Backdate: 5 * time.Second},
			parent: shortRoot, role: "intermediate", notBefore: t0.Add(30*time.Minute - 5*time.Second), notAfter: t0.Add(time.Hour)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			tc.req.TrustDomain = td
			c, key, err := authority.Mint(tc.req)
			if err != nil {
				t.Fatal(err)
			}
			// Parse back what would be written, as a reader of the files does.
			parsed, err := pemutil.ParseCertificate(authority.EncodeCertificates(c))
			if err != nil {
				t.Fatal(err)
			}
			if !key.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(parsed.PublicKey) {
				t.Error("the returned key does not belong to the certificate")
			}
			if !parsed.NotBefore.Equal(tc.notBefore) || !parsed.NotAfter.Equal(tc.notAfter) {
				t.Errorf("valid %s to %s, want %s to %s", parsed.NotBefore, parsed.NotAfter, tc.notBefore, tc.notAfter)
			}
			if !parsed.IsCA || !parsed.BasicConstraintsValid {
				t.Error("not a CA")
			}
			if parsed.MaxPathLen != tc.maxPathLen || tc.maxPathLen == 0 && !parsed.MaxPathLenZero {
				t.Errorf("path length %d (zero %v), want %d", parsed.MaxPathLen, parsed.MaxPathLenZero, tc.maxPathLen)
			}
			if parsed.KeyUsage != x509.KeyUsageCertSign|x509.KeyUsageCRLSign || len(parsed.ExtKeyUsage) != 0 {
				t.Errorf("key usage %b, ext %v; want cert and CRL signing only", parsed.KeyUsage, parsed.ExtKeyUsage)
			}
			if len(parsed.URIs) != 1 || parsed.URIs[0].String() != "spiffe://cluster.local" || len(parsed.DNSNames)+len(parsed.IPAddresses)+len(parsed.EmailAddresses) != 0 {
				t.Errorf("SANs %v %v %v %v; want the trust domain's SPIFFE ID alone", parsed.URIs, parsed.DNSNames, parsed.IPAddresses, parsed.EmailAddresses)
			}
			wantCN := fmt.Sprintf("trustmesh %s cluster.local %s", tc.role, tc.req.Now.UTC().Format(time.RFC3339))
			if parsed.Subject.CommonName != wantCN || strings.Join(parsed.Subject.Organization, ",") != "trustmesh" {
				t.Errorf("subject %q, want O=trustmesh CN=%q", parsed.Subject, wantCN)
			}
			parent := tc.parent
			if parent == nil {
				parent = parsed
			}
			pool := x509.NewCertPool()
			pool.AddCert(parent)
			if _, err := parsed.Verify(x509.VerifyOptions{Roots: pool, CurrentTime: tc.req.Now,
				KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
				t.Errorf("does not verify under its parent: %v", err)
			}
		})
	}
}

// TestMintRefuses checks that a request that cannot make a usable CA
// certificate is refused before anything is signed.
func TestMintRefuses(t *testing.T) {
	root, rootKey, err := authority.Mint(authority.MintRequest{TrustDomain: td, Now: t0, Lifetime: time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	for name, req := range map[string]authority.MintRequest{
		"no trust domain":   {Now: t0, Lifetime: time.Hour},
		"no lifetime":       {TrustDomain: td, Now: t0},
		"negative backdate": {TrustDomain: td, Now: t0, Lifetime: time.Hour, Backdate: -time.Second},
		"parent, no key":    {TrustDomain: td, Parent: root, Now: t0, Lifetime: time.Hour},
		"key, no parent":    {TrustDomain: td, ParentKey: rootKey, Now: t0, Lifetime: time.Hour},
		// The root is not valid yet: what is signed under it cannot verify.
		"parent not yet valid": {TrustDomain: td, Parent: root, ParentKey: rootKey, Now: t0.Add(-time.Hour), Lifetime: time.Hour},
	} {
		if c, _, err := authority.Mint(req); err == nil {
			t.Errorf("%s: minted %q", name, c.Subject)
		}
	}
}

// TestSelfManagedGeneration checks the generation files: the same
// conventions through NewSelfManagedFiles, with the lifetimes and backdate
// asked for.
func TestSelfManagedGeneration(t *testing.T) {
	files, err := authority.NewSelfManagedFiles(td, t0, authority.Lifetimes{Root: 3 * time.Hour, Intermediate: 60 * time.Second, Backdate: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	m, err := authority.ReadCertificates(files)
	if err != nil {
		t.Fatal(err)
	}
	if m.Anchor == nil || !m.Anchor.NotBefore.Equal(t0.Add(-5*time.Second)) || !m.Anchor.NotAfter.Equal(t0.Add(3*time.Hour)) {
		t.Fatalf("root %+v; want valid from 5s before to 3h after", m.Anchor)
	}
	if !m.Cert.NotBefore.Equal(t0.Add(-5*time.Second)) || !m.Cert.NotAfter.Equal(t0.Add(60*time.Second)) {
		t.Fatalf("intermediate valid %s to %s", m.Cert.NotBefore, m.Cert.NotAfter)
	}
	if !strings.HasPrefix(m.Anchor.Subject.CommonName, "trustmesh root cluster.local ") || !strings.HasPrefix(m.Cert.Subject.CommonName, "trustmesh intermediate cluster.local ") {
		t.Fatalf("CNs %q, %q", m.Anchor.Subject.CommonName, m.Cert.Subject.CommonName)
	}
}
