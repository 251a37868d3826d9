package adversary

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
)

const td = "spiffe://cluster.local"

// workload is a key and, once issued, a certificate chain from the CA.
type workload struct {
	id    string
	key   *ecdsa.PrivateKey
	chain []*x509.Certificate // leaf first
}

func newKey(t *testing.T) *ecdsa.PrivateKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// token creates a one-time join token for id with the operator's CLI.
func (s *server) token(t *testing.T, id string) string {
	t.Helper()
	out, err := s.cli("ca", "token", "create", "--data-dir", s.dataDir, "--spiffe-id", id, "--ttl", "10m")
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(out))
}

// tokens creates n join tokens for id at once.
func (s *server) tokens(t *testing.T, id string, n int) []string {
	t.Helper()
	out := make([]string, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			var b []byte
			b, errs[i] = s.cli("ca", "token", "create", "--data-dir", s.dataDir, "--spiffe-id", id, "--ttl", "10m")
			out[i] = strings.TrimSpace(string(b))
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	return out
}

// enrol obtains a certificate for id with a fresh join token, as a workload
// off Kubernetes does.
func (s *server) enrol(t *testing.T, id string) *workload {
	t.Helper()
	w := &workload{id: id, key: newKey(t)}
	resp, err := createCertificate(s.dialCA(t, nil), s.token(t, id), csrPEM(t, w.key, nil), time.Hour)
	if err != nil {
		t.Fatalf("enrolling %s: %v", id, err)
	}
	w.chain = parseChain(t, resp)
	if len(w.chain[0].URIs) != 1 || w.chain[0].URIs[0].String() != id {
		t.Fatalf("enrolled %s, got a certificate for %v", id, w.chain[0].URIs)
	}
	return w
}

// tlsCert is the workload's certificate and key for a TLS client.
func (w *workload) tlsCert() tls.Certificate {
	c := tls.Certificate{PrivateKey: w.key, Leaf: w.chain[0]}
	for _, x := range w.chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// clientTLS trusts the CA's bundle and presents w's certificate, if any.
func (s *server) clientTLS(w *workload) *tls.Config {
	cfg := &tls.Config{RootCAs: s.roots, ServerName: "localhost", MinVersion: tls.VersionTLS12}
	if w != nil {
		cfg.Certificates = []tls.Certificate{w.tlsCert()}
	}
	return cfg
}

// dialGRPC connects to addr over TLS as w; the connection closes when the
// test ends.
func (s *server) dialGRPC(t *testing.T, addr string, w *workload) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(s.clientTLS(w))))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// dialCA connects to the CA port as w (nil: with no client certificate).
func (s *server) dialCA(t *testing.T, w *workload) pb.IstioCertificateServiceClient {
	return pb.NewIstioCertificateServiceClient(s.dialGRPC(t, s.ca, w))
}

// createCertificate asks for a certificate as istio-agent does, with the
// token (if any) as a bearer credential.
func createCertificate(c pb.IstioCertificateServiceClient, token, csr string, ttl time.Duration) (*pb.IstioCertificateResponse, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.NewOutgoingContext(ctx, metadata.Pairs("authorization", "Bearer "+token, "clusterid", "Kubernetes"))
	}
	return c.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr, ValidityDuration: int64(ttl / time.Second)})
}

// createCertificateSeconds is createCertificate with the lifetime in
// seconds given as it goes on the wire, when seconds is not zero.
func createCertificateSeconds(c pb.IstioCertificateServiceClient, token, csr string, ttl time.Duration, seconds int64) (*pb.IstioCertificateResponse, error) {
	if seconds == 0 {
		return createCertificate(c, token, csr, ttl)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.NewOutgoingContext(ctx, metadata.Pairs("authorization", "Bearer "+token, "clusterid", "Kubernetes"))
	return c.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr, ValidityDuration: seconds})
}

// csrPEM makes a CSR for key from tmpl (nil: an empty request).
func csrPEM(t *testing.T, key *ecdsa.PrivateKey, tmpl *x509.CertificateRequest) string {
	t.Helper()
	if tmpl == nil {
		tmpl = &x509.CertificateRequest{}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func parseChain(t *testing.T, resp *pb.IstioCertificateResponse) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, p := range resp.GetCertChain() {
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			t.Fatalf("chain element is not PEM: %q", p)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	if len(out) == 0 {
		t.Fatal("empty certificate chain")
	}
	return out
}

// verifyLeaf checks an issued chain against the server's roots as a relying
// party would.
func (s *server) verifyLeaf(chain []*x509.Certificate) error {
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	_, err := chain[0].Verify(x509.VerifyOptions{Roots: s.roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}})
	if err != nil {
		return fmt.Errorf("issued certificate does not verify: %w", err)
	}
	return nil
}

func credentialsFor(s *server, w *workload) credentials.TransportCredentials {
	return credentials.NewTLS(s.clientTLS(w))
}
