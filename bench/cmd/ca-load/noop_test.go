package main

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"net/url"
	"testing"
	"time"
)

// The signing floor issues for the CSR's key, under its intermediate, and
// refuses a CSR whose signature does not hold: it does the proof-of-
// possession check a CA must do, so that its rate bounds a real CA's.
func TestSigningFloor(t *testing.T) {
	now := time.Now()
	root, rootKey, err := mintCert(nil, nil, now, func(c *x509.Certificate) { c.IsCA, c.KeyUsage = true, x509.KeyUsageCertSign })
	if err != nil {
		t.Fatal(err)
	}
	id := &url.URL{Scheme: "spiffe", Host: "bench.local", Path: "/bench/w0"}
	s := &csrSigner{issuer: root, key: rootKey, id: id}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	leafDER, err := s.sign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		t.Fatal(err)
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		t.Error("the leaf does not hold the CSR's key")
	}
	if err := leaf.CheckSignatureFrom(root); err != nil {
		t.Errorf("the leaf is not signed by the issuer: %v", err)
	}
	if len(leaf.URIs) != 1 || leaf.URIs[0].String() != id.String() {
		t.Errorf("leaf URIs %v, want %s", leaf.URIs, id)
	}

	// Flip a bit of the CSR's signature, its last bytes.
	bad := append([]byte(nil), der...)
	bad[len(bad)-2] ^= 1
	if _, err := s.sign(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: bad})); err == nil {
		t.Error("signed a CSR whose signature does not verify")
	}
	if _, err := s.sign([]byte("not a CSR")); err == nil {
		t.Error("signed a request with no PEM CSR")
	}
}
