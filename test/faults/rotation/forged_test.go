package rotation

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"math/big"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/ca/authority"
)

// csrRequest asks the CA for a certificate, authenticated by token or, with
// token empty, by the client chain and its key.
func csrRequest(t *testing.T, caAddr string, roots *x509.CertPool, key crypto.Signer, chain []*x509.Certificate, token string) ([]*x509.Certificate, error) {
	t.Helper()
	cfg := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1"}
	if token == "" {
		cert := tls.Certificate{PrivateKey: key}
		for _, c := range chain {
			cert.Certificate = append(cert.Certificate, c.Raw)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		return nil, err
	}
	var out []*x509.Certificate
	for _, p := range resp.CertChain {
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			t.Fatal("a certificate of the chain is not PEM")
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out[:len(out)-1], nil
}

func readPEMCert(t *testing.T, path string) *x509.Certificate {
	t.Helper()
	raw, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(raw)
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// TestStolenIntermediateAfterTaint is what an attacker holding the tainted
// intermediate's key can do against the real serve after `ca rotate
// --taint`: a leaf it forges for a workload's identity must not buy a
// certificate from the CA, whether it invents a serial or copies the serial
// of a certificate the journal recorded. The workload's genuine certificate
// under the tainted intermediate still renews (that is how agents move).
func TestStolenIntermediateAfterTaint(t *testing.T) {
	if testing.Short() {
		t.Skip("runs trustmesh serve")
	}
	dir := tempDir(t, "faults-rotation-stolen-")
	s := startServe(t, filepath.Join(dir, "data"))
	pool := x509.NewCertPool()
	raw, err := os.ReadFile(s.bundleFile(t, dir))
	if err != nil || !pool.AppendCertsFromPEM(raw) {
		t.Fatalf("CA bundle: %v", err)
	}
	id := "spiffe://cluster.local/ns/default/sa/victim"
	token := strings.TrimSpace(cli(t, "ca", "token", "create", "--data-dir", s.dataDir, "--spiffe-id", id, "--ttl", "10m"))
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	genuine, err := csrRequest(t, s.caAddr, pool, key, nil, token)
	if err != nil {
		t.Fatalf("first issuance by join token: %v", err)
	}
	oldInter := genuine[1]

	cli(t, "ca", "rotate", "--taint", "--data-dir", s.dataDir)
	// serve picks the rotation up at its next check (every second); the
	// first handshake after that gets a serving certificate from the new
	// intermediate.
	eventually(t, 30*time.Second, "serve signing under the new intermediate", func() bool {
		conn, err := tls.Dial("tcp", s.caAddr, &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})
		if err != nil {
			return false
		}
		defer conn.Close()
		chain := conn.ConnectionState().PeerCertificates
		return len(chain) > 1 && !chain[1].Equal(oldInter)
	})

	keyPEM, err := os.ReadFile(filepath.Join(s.dataDir, "ca", "gen-1", "ca-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	stolen, err := authority.SignerFromPEM(context.Background(), keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	if !readPEMCert(t, filepath.Join(s.dataDir, "ca", "gen-1", "ca-cert.pem")).Equal(oldInter) {
		t.Fatal("generation 1 is not the tainted intermediate")
	}
	attacker, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	forge := func(serial *big.Int) []*x509.Certificate {
		tmpl := &x509.Certificate{
			SerialNumber: serial, URIs: genuine[0].URIs,
			NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
			KeyUsage:    x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
			ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, oldInter, attacker.Public(), stolen)
		if err != nil {
			t.Fatal(err)
		}
		c, _ := x509.ParseCertificate(der)
		return []*x509.Certificate{c, oldInter}
	}
	for _, tc := range []struct {
		name   string
		serial *big.Int
	}{
		{"invented serial", big.NewInt(0).SetBytes([]byte("forged-by-attacker"))},
		{"serial copied from the journal", genuine[0].SerialNumber},
	} {
		got, err := csrRequest(t, s.caAddr, pool, attacker, forge(tc.serial), "")
		if err == nil {
			t.Errorf("%s: a leaf forged with the tainted intermediate's key renewed into %s under %q", tc.name,
				fmt.Sprintf("%x", got[0].SerialNumber), got[1].Subject.CommonName)
		} else {
			t.Logf("%s: refused: %v", tc.name, err)
		}
	}
	renewed, err := csrRequest(t, s.caAddr, pool, key, genuine, "")
	if err != nil {
		t.Fatalf("the genuine certificate under the tainted intermediate did not renew: %v", err)
	}
	if renewed[1].Equal(oldInter) {
		t.Fatal("the renewal was signed by the tainted intermediate")
	}
}
