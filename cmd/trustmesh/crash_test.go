package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// renewer is a workload renewing its certificate over mTLS.
type renewer struct {
	key   crypto.Signer
	chain []*x509.Certificate
}

func (r *renewer) request(ctx context.Context, caAddr string, roots *x509.CertPool, token string) error {
	cfg := &tls.Config{RootCAs: roots, ServerName: "localhost"}
	if token == "" {
		cert := tls.Certificate{PrivateKey: r.key}
		for _, c := range r.chain {
			cert.Certificate = append(cert.Certificate, c.Raw)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		return err
	}
	defer conn.Close()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, r.key)
	if err != nil {
		return err
	}
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		return err
	}
	var chain []*x509.Certificate
	for _, p := range resp.CertChain[:2] {
		b, _ := pem.Decode([]byte(p))
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return err
		}
		chain = append(chain, c)
	}
	r.chain = chain
	return nil
}

// TestCrashDuringIssuance kills `trustmesh serve` with SIGKILL in the middle
// of a burst of concurrent issuances. Every certificate any client received
// is afterwards in the journal, with a valid inclusion proof.
func TestCrashDuringIssuance(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	p := startServe(t, dataDir)
	_, _, roots := bundleOf(t, dataDir)

	const workloads = 8
	var rs []*renewer
	for i := range workloads {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		r := &renewer{key: key}
		id := spiffeid.RequireFromString("spiffe://cluster.local/vm/crash-" + string(rune('a'+i)))
		tok := strings.TrimSpace(run(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", id.String()))
		if err := r.request(context.Background(), p.ca, roots, tok); err != nil {
			t.Fatal(err)
		}
		rs = append(rs, r)
	}

	var mu sync.Mutex
	var received []string
	var count atomic.Int64
	var wg sync.WaitGroup
	for _, r := range rs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for range 10_000 {
				ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
				err := r.request(ctx, p.ca, roots, "")
				cancel()
				if err != nil {
					return // the CA is gone
				}
				mu.Lock()
				received = append(received, r.chain[0].SerialNumber.Text(16))
				mu.Unlock()
				count.Add(1)
			}
		}()
	}
	deadline := time.Now().Add(60 * time.Second)
	for count.Load() < 200 && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	if err := p.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = p.cmd.Wait()
	wg.Wait()
	if len(received) < 200 {
		t.Fatalf("only %d certificates were issued before the kill", len(received))
	}

	vkey, err := os.ReadFile(filepath.Join(dataDir, "checkpoint.pub"))
	if err != nil {
		t.Fatal(err)
	}
	store, err := journal.Open(context.Background(), journal.Config{DSN: filepath.Join(dataDir, "journal.db"),
		VerifierKey: strings.TrimSpace(string(vkey))})
	if err != nil {
		t.Fatal(err)
	}
	defer store.Close()
	if err := store.Integrity(); err != nil {
		t.Fatalf("after SIGKILL the journal does not match its checkpoint: %v", err)
	}
	rep, err := journal.Verify(context.Background(), store, strings.TrimSpace(string(vkey)), nil)
	if err != nil || !rep.OK() {
		t.Fatalf("verify after SIGKILL = %+v, %v", rep, err)
	}
	for _, serial := range received {
		proof, err := journal.Prove(context.Background(), store, serial)
		if err != nil {
			t.Fatalf("certificate %s was received but: %v", serial, err)
		}
		if _, err := journal.CheckProof(proof, strings.TrimSpace(string(vkey))); err != nil {
			t.Fatalf("inclusion proof of %s: %v", serial, err)
		}
	}
	t.Logf("%d certificates received before SIGKILL; all journalled with valid proofs (%d entries)", len(received), rep.Entries)

	// The same through the commands an auditor runs.
	if out := run(t, "audit", "verify", "--data-dir", dataDir); !strings.Contains(out, "OK") {
		t.Fatalf("audit verify printed %q", out)
	}
	proofFile := filepath.Join(t.TempDir(), "proof.json")
	if err := os.WriteFile(proofFile, []byte(run(t, "audit", "prove", "--data-dir", dataDir, "--serial", received[0])), 0o600); err != nil {
		t.Fatal(err)
	}
	out := run(t, "audit", "check-proof", "--key", strings.TrimSpace(string(vkey)), "--proof", proofFile)
	if !strings.Contains(out, received[0]) {
		t.Fatalf("check-proof printed %q; want the entry of %s", out, received[0])
	}
}
