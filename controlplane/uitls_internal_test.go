package controlplane

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestUIClientCertOrToken: with a client CA alone, the handshake asks for
// a certificate; with a token as well, a client without one still gets
// through the handshake to present the token, as the README promises
// ("either").
func TestUIClientCertOrToken(t *testing.T) {
	dir := t.TempDir()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: time.Now(), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kder, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name, typ string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: b}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	cert, keyFile := write("cert.pem", "CERTIFICATE", der), write("key.pem", "EC PRIVATE KEY", kder)
	token := filepath.Join(dir, "token")
	if err := os.WriteFile(token, []byte("correct-horse-battery-staple"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		tokenFile string
		want      tls.ClientAuthType
	}{{"", tls.RequireAndVerifyClientCert}, {token, tls.VerifyClientCertIfGiven}} {
		c := &UIConfig{TLSCert: cert, TLSKey: keyFile, ClientCA: cert, TokenFile: tc.tokenFile}
		_, cfg, errs := c.inputs(false)
		for _, err := range errs {
			if err != nil {
				t.Fatal(err)
			}
		}
		if cfg == nil || cfg.ClientAuth != tc.want {
			t.Errorf("token file %q: client auth %v, want %v", tc.tokenFile, cfg.ClientAuth, tc.want)
		}
	}
}
