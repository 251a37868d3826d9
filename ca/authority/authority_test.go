package authority_test

import (
	"context"
	"crypto"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/keyutil"
	"go.step.sm/crypto/x509util"

	"github.com/trustmesh/trustmesh/ca/authority"
)

var (
	td = spiffeid.RequireTrustDomainFromString("cluster.local")
	t0 = time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
)

func TestGenerateSelfManaged(t *testing.T) {
	m, err := authority.Generate(context.Background(), td, t0, 0)
	if err != nil {
		t.Fatal(err)
	}
	if got := m.Roots[0].NotAfter.Sub(t0); got < authority.RootLifetime-time.Hour || got > authority.RootLifetime {
		t.Errorf("root lives %s from now, want about %s", got, authority.RootLifetime)
	}
	if got := m.Cert.NotAfter.Sub(t0); got != authority.IntermediateLifetime {
		t.Errorf("intermediate lives %s from now, want %s", got, authority.IntermediateLifetime)
	}
	if len(m.Chain) != 1 || !m.Chain[0].Equal(m.Cert) || len(m.Roots) != 1 || !m.Anchor.Equal(m.Roots[0]) {
		t.Fatalf("chain %d, roots %d; want the intermediate alone under one root", len(m.Chain), len(m.Roots))
	}
	if u := m.Roots[0].URIs; len(u) != 1 || u[0].String() != "spiffe://cluster.local" {
		t.Errorf("root URIs %v, want the trust domain", u)
	}
}

// operatorCA writes an Istio cacerts directory: an intermediate under root
// A, and root-cert.pem holding roots A and B. mutate may spoil it.
func operatorCA(t *testing.T, mutate func(dir string, rootA, inter *x509.Certificate)) string {
	t.Helper()
	dir := t.TempDir()
	newRoot := func(name string) (*x509.Certificate, crypto.Signer) {
		key, err := keyutil.GenerateSigner("EC", "P-256", 0)
		if err != nil {
			t.Fatal(err)
		}
		tmpl := &x509.Certificate{Subject: pkix.Name{CommonName: name}, NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(48 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
		c, err := x509util.CreateCertificate(tmpl, tmpl, key.Public(), key)
		if err != nil {
			t.Fatal(err)
		}
		return c, key
	}
	rootA, keyA := newRoot("root A")
	rootB, _ := newRoot("root B")
	inter, interKey, err := authority.Mint(authority.MintRequest{TrustDomain: td, Parent: rootA, ParentKey: keyA, Now: t0, Lifetime: 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(interKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, data []byte) {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(authority.CAKeyFile, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}))
	write(authority.CACertFile, authority.EncodeCertificates(inter))
	write(authority.CertChainFile, authority.EncodeCertificates(inter, rootA))
	write(authority.RootCertFile, authority.EncodeCertificates(rootA, rootB))
	if mutate != nil {
		mutate(dir, rootA, inter)
	}
	return dir
}

func TestOperatorSuppliedCACerts(t *testing.T) {
	dir := operatorCA(t, nil)
	m, err := loadDir(dir, t0)
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Roots) != 2 {
		t.Fatalf("bundle has %d roots, want both of root-cert.pem", len(m.Roots))
	}
	if len(m.Chain) != 1 || !m.Chain[0].Equal(m.Cert) {
		t.Fatalf("chain has %d certificates; want the intermediate alone, the root dropped", len(m.Chain))
	}
}

func TestOperatorSuppliedCACertsAreChecked(t *testing.T) {
	cases := []struct {
		name   string
		mutate func(dir string, rootA, inter *x509.Certificate)
		want   string
	}{
		{"key of another certificate", func(dir string, _, _ *x509.Certificate) {
			k, _ := keyutil.GenerateSigner("EC", "P-256", 0)
			der, _ := x509.MarshalPKCS8PrivateKey(k)
			os.WriteFile(filepath.Join(dir, authority.CAKeyFile), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600)
		}, "does not belong"},
		{"an intermediate in the bundle", func(dir string, _, inter *x509.Certificate) {
			os.WriteFile(filepath.Join(dir, authority.RootCertFile), authority.EncodeCertificates(inter), 0o600)
		}, "not self-signed"},
		{"a missing file", func(dir string, _, _ *x509.Certificate) {
			os.Remove(filepath.Join(dir, authority.CertChainFile))
		}, authority.CertChainFile},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := operatorCA(t, tc.mutate)
			_, err := loadDir(dir, t0)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Load() = %v, want an error about %q", err, tc.want)
			}
		})
	}
	_, err := loadDir(operatorCA(t, nil), t0.Add(72*time.Hour))
	if err == nil || !strings.Contains(err.Error(), "not valid now") {
		t.Fatalf("Load() of expired material = %v, want an error", err)
	}
}

// A bundle change wakes watchers and bumps the sequence number.
func TestBundleWatch(t *testing.T) {
	m, err := authority.Generate(context.Background(), td, t0, 0)
	if err != nil {
		t.Fatal(err)
	}
	a := authority.New(td, m)
	b1, changed := a.Bundle()
	a.Replace(m)
	select {
	case <-changed:
	default:
		t.Fatal("Replace did not wake the watcher")
	}
	b2, _ := a.Bundle()
	s1, _ := b1.SequenceNumber()
	s2, _ := b2.SequenceNumber()
	if s2 != s1+1 {
		t.Fatalf("sequence %d then %d, want an increment", s1, s2)
	}
}

// loadDir loads operator material from dir as serve --cacerts does: the
// certificates read, the key referenced where it lies.
func loadDir(dir string, now time.Time) (*authority.Material, error) {
	files, err := authority.ReadCACerts(dir, "")
	if err != nil {
		return nil, err
	}
	return authority.LoadFiles(context.Background(), files, "", now)
}
