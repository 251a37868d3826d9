package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
)

// binary is the trustmesh binary built for process-level tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "trustmesh-bin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binary = filepath.Join(dir, "trustmesh")
	if out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput(); err != nil {
		fmt.Fprintf(os.Stderr, "build trustmesh: %v\n%s", err, out)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

func freePort(t *testing.T) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

type serveProc struct {
	cmd            *exec.Cmd
	ca, monitoring string
	stderr         bytes.Buffer
}

// startServe runs `trustmesh serve` as a process and waits until it is ready.
func startServe(t *testing.T, dataDir string) *serveProc {
	t.Helper()
	p := &serveProc{ca: freePort(t), monitoring: freePort(t)}
	p.cmd = exec.Command(binary, "serve", "--data-dir", dataDir,
		"--listen-ca", p.ca, "--listen-monitoring", p.monitoring, "--listen-bundle", "")
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.cmd.Process.Kill(); _ = p.cmd.Wait() })
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + p.monitoring + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("trustmesh serve did not become ready:\n%s", p.stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (p *serveProc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("trustmesh serve exited with %v:\n%s", err, p.stderr.String())
	}
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(binary, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("trustmesh %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// issue obtains a certificate from a running serve with a join token.
func issue(t *testing.T, caAddr string, roots *x509.CertPool, token string) []*x509.Certificate {
	t.Helper()
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost"})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	ctx := metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token)
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		t.Fatal(err)
	}
	var chain []*x509.Certificate
	for _, p := range resp.CertChain {
		b, _ := pem.Decode([]byte(p))
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, c)
	}
	return chain
}

func bundleOf(t *testing.T, dataDir string) (string, *x509bundle.Bundle, *x509.CertPool) {
	t.Helper()
	out := run(t, "ca", "bundle", "--data-dir", dataDir)
	b, err := x509bundle.Parse(spiffeid.RequireTrustDomainFromString("cluster.local"), []byte(out))
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, c := range b.X509Authorities() {
		pool.AddCert(c)
	}
	return out, b, pool
}

// TestServeRestartKeepsCA restarts `trustmesh serve` on the same data
// directory: it keeps its CA, and what it issued before still verifies.
func TestServeRestartKeepsCA(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	id := spiffeid.RequireFromString("spiffe://cluster.local/vm/restart")

	first := startServe(t, dataDir)
	bundlePEM, _, roots := bundleOf(t, dataDir)
	token := strings.TrimSpace(run(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", id.String(), "--ttl", "10m"))
	if !strings.HasPrefix(token, "tmjt.") || strings.ContainsAny(token, " \n") {
		t.Fatalf("token create printed %q, want only the token", token)
	}
	before := issue(t, first.ca, roots, token)
	first.stop(t)

	for _, f := range []string{"ca/gen-1/root-key.pem", "ca/gen-1/ca-key.pem", "journal.db", "checkpoint-key.pem"} {
		fi, err := os.Stat(filepath.Join(dataDir, f))
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o600 {
			t.Errorf("%s has mode %v, want 0600", f, fi.Mode().Perm())
		}
	}

	second := startServe(t, dataDir)
	afterPEM, bundle, roots := bundleOf(t, dataDir)
	if afterPEM != bundlePEM {
		t.Fatal("the trust bundle changed across a restart")
	}
	if got, _, err := x509svid.Verify(before[:2], bundle); err != nil || got != id {
		t.Fatalf("a certificate issued before the restart = %v, %v; want it to verify as %s", got, err, id)
	}
	token2 := strings.TrimSpace(run(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", id.String()))
	after := issue(t, second.ca, roots, token2)
	if !after[1].Equal(before[1]) || !after[2].Equal(before[2]) {
		t.Fatal("the restarted CA signs with another intermediate or root")
	}
	second.stop(t)
}

func TestVersion(t *testing.T) {
	if out := run(t, "version"); !strings.HasPrefix(out, "trustmesh ") {
		t.Fatalf("version printed %q", out)
	}
}
