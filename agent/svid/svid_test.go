package svid

import (
	"crypto/x509"
	"encoding/pem"
	"errors"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/agent/internal/testca"
)

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	own   = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	other = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/payments")
	now   = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
)

func TestKeyTypesAndCSR(t *testing.T) {
	for _, kt := range KeyTypes {
		t.Run(string(kt), func(t *testing.T) {
			parsed, err := ParseKeyType(string(kt))
			if err != nil || parsed != kt {
				t.Fatalf("ParseKeyType(%q) = %q, %v", kt, parsed, err)
			}
			key, err := GenerateKey(kt)
			if err != nil {
				t.Fatal(err)
			}
			for _, id := range []spiffeid.ID{{}, own} {
				csrPEM, err := NewCSR(key, id)
				if err != nil {
					t.Fatal(err)
				}
				block, _ := pem.Decode(csrPEM)
				csr, err := x509.ParseCertificateRequest(block.Bytes)
				if err != nil {
					t.Fatal(err)
				}
				if err := csr.CheckSignature(); err != nil {
					t.Fatal(err)
				}
				switch {
				case id.IsZero() && len(csr.URIs) != 0:
					t.Fatalf("CSR without ID carries URIs %v", csr.URIs)
				case !id.IsZero() && (len(csr.URIs) != 1 || csr.URIs[0].String() != id.String()):
					t.Fatalf("CSR URIs %v, want exactly %s", csr.URIs, id)
				}
				if len(csr.DNSNames)+len(csr.IPAddresses)+len(csr.EmailAddresses) != 0 {
					t.Fatal("CSR carries SANs other than the SPIFFE ID")
				}
			}
		})
	}
	if _, err := ParseKeyType("dsa-1024"); err == nil {
		t.Fatal("unknown key type accepted")
	}
}

func TestVerify(t *testing.T) {
	auth := testca.New(t, td, now)
	foreign := testca.New(t, td, now)
	otherTD := testca.New(t, spiffeid.RequireTrustDomainFromString("example.org"), now)
	key, err := GenerateKey(ECP256)
	if err != nil {
		t.Fatal(err)
	}
	otherKey, err := GenerateKey(ECP256)
	if err != nil {
		t.Fatal(err)
	}
	issue := func(a *testca.Authority, id spiffeid.ID, notBefore time.Time, ttl time.Duration) []*x509.Certificate {
		chain, err := a.Issue(key.Public(), id, notBefore, ttl)
		if err != nil {
			t.Fatal(err)
		}
		return chain
	}
	good := issue(auth, own, now, time.Hour)
	for _, tc := range []struct {
		name    string
		req     VerifyRequest
		wantErr error
	}{
		{"issued chain", VerifyRequest{Chain: good, Key: key, Bundle: auth.Bundle(), Want: own, Now: now}, nil},
		{"first issuance learns the ID", VerifyRequest{Chain: good, Key: key, Bundle: auth.Bundle(), Now: now}, nil},
		{"chain without root", VerifyRequest{Chain: good[:2], Key: key, Bundle: auth.Bundle(), Want: own, Now: now}, nil},
		{"NotBefore within clock skew", VerifyRequest{Chain: issue(auth, own, now.Add(30*time.Second), time.Hour), Key: key, Bundle: auth.Bundle(), Want: own, Now: now}, nil},
		{"another identity", VerifyRequest{Chain: issue(auth, other, now, time.Hour), Key: key, Bundle: auth.Bundle(), Want: own, Now: now}, ErrIdentityMismatch},
		{"another key", VerifyRequest{Chain: good, Key: otherKey, Bundle: auth.Bundle(), Want: own, Now: now}, ErrKeyMismatch},
		{"another CA", VerifyRequest{Chain: issue(foreign, own, now, time.Hour), Key: key, Bundle: auth.Bundle(), Want: own, Now: now}, ErrUntrusted},
		{"another trust domain", VerifyRequest{Chain: issue(otherTD, spiffeid.RequireFromString("spiffe://example.org/x"), now, time.Hour), Key: key, Bundle: auth.Bundle(), Now: now}, ErrUntrusted},
		{"expired", VerifyRequest{Chain: good, Key: key, Bundle: auth.Bundle(), Want: own, Now: now.Add(time.Hour)}, ErrUntrusted},
		{"not yet valid beyond skew", VerifyRequest{Chain: issue(auth, own, now.Add(5*time.Minute), time.Hour), Key: key, Bundle: auth.Bundle(), Want: own, Now: now}, ErrUntrusted},
		{"no bundle", VerifyRequest{Chain: good, Key: key, Want: own, Now: now}, ErrUntrusted},
		{"empty chain", VerifyRequest{Key: key, Bundle: auth.Bundle(), Want: own, Now: now}, ErrUntrusted},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Verify(tc.req)
			if tc.wantErr != nil {
				if !errors.Is(err, tc.wantErr) {
					t.Fatalf("Verify error %v, want %v", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got.ID != own {
				t.Fatalf("ID %s, want %s", got.ID, own)
			}
			if len(got.Certificates) != 2 || got.Certificates[1] != auth.Inter {
				t.Fatalf("SVID chain has %d certificates, want leaf and intermediate without the root", len(got.Certificates))
			}
			if want := tc.req.Chain[0].NotAfter; !Expiry(got).Equal(want) {
				t.Fatalf("Expiry %s, want %s", Expiry(got), want)
			}
		})
	}
}
