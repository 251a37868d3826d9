// Package upgrade_test starts this build on a data directory and an agent
// state written by the commit issue 14 started from (testdata, made by
// testdata/generate.sh): the journal verifies, the CA in force is kept,
// the old certificate still verifies under the bundle the new build serves,
// and the agent restores its identity and renews it over the wire.
package upgrade_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/internal/binary"
)

var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "faults-upgrade-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if bin, err = binary.BuildTrustmesh(dir, "FAULTS_TRUSTMESH"); err != nil {
		os.RemoveAll(dir)
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

const agentID = "spiffe://cluster.local/vm/db-1"

// copyFixture copies testdata/name to an owner-only directory, as the old
// build left it (git keeps no modes).
func copyFixture(t *testing.T, name string) string {
	t.Helper()
	dst := filepath.Join(t.TempDir(), name)
	src := filepath.Join("testdata", name)
	err := filepath.WalkDir(src, func(p string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(src, p)
		if e.IsDir() {
			return os.MkdirAll(filepath.Join(dst, rel), 0o700)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		return os.WriteFile(filepath.Join(dst, rel), b, 0o600)
	})
	if err != nil {
		t.Fatal(err)
	}
	return dst
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	var out, errb bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &out, &errb
	if err := cmd.Run(); err != nil {
		t.Fatalf("trustmesh %s: %v\n%s%s", strings.Join(args, " "), err, out.String(), errb.String())
	}
	return out.String()
}

func sum(t *testing.T, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	s := sha256.Sum256(b)
	return hex.EncodeToString(s[:])
}

func TestUpgradeFrom78c56eb(t *testing.T) {
	data := copyFixture(t, "data")
	stateDir := copyFixture(t, "state")
	genFiles, _ := filepath.Glob(filepath.Join(data, "ca", "gen-1", "*.pem"))
	before := map[string]string{}
	for _, f := range append(genFiles, filepath.Join(data, "checkpoint-key.pem")) {
		before[f] = sum(t, f)
	}

	// The old journal verifies under the new build before it serves.
	if out := run(t, "audit", "verify", "--data-dir", data); !strings.Contains(out, "OK") {
		t.Fatalf("audit verify of the old journal: %s", out)
	}

	caAddr := freeport.Addr(t)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	srv := exec.CommandContext(ctx, bin, "serve", "--data-dir", data, "--kubernetes", "off",
		"--listen-ca", caAddr, "--listen-monitoring", freeport.Addr(t), "--listen-authz", "off",
		"--listen-bundle", "", "--listen-injector", "off", "--listen-ui", "off", "--manual-ca-rotation",
		"--ca-intermediate-ttl", "60000h", "--max-workload-ttl", "50000h", "--default-workload-ttl", "50000h")
	var srvOut lockedBuffer
	srv.Stdout, srv.Stderr = &srvOut, &srvOut
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() { _ = srv.Process.Signal(os.Interrupt); _ = srv.Wait() }()
	waitFor(t, func() bool { return strings.Contains(srvOut.String(), "trustmesh control plane serving") }, &srvOut)

	// The CA in force is the old one: no new generation, no new key.
	for f, h := range before {
		if sum(t, f) != h {
			t.Errorf("%s changed on upgrade", f)
		}
	}
	if gens, _ := filepath.Glob(filepath.Join(data, "ca", "gen-*")); len(gens) != 1 {
		t.Errorf("generations after the upgrade: %v, want only gen-1", gens)
	}

	// The old certificate verifies under the bundle the new build serves.
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM([]byte(run(t, "ca", "bundle", "--data-dir", data))) {
		t.Fatal("ca bundle printed no certificates")
	}
	key, chain := loadSVID(t, filepath.Join(stateDir, "svid.pem"))
	verify(t, chain, roots)

	// The new agent restores the old identity from its state.
	agentSock := filepath.Join(t.TempDir(), "agent.sock")
	bundleFile := filepath.Join(stateDir, "bundle.pem")
	// No monitoring port: the default, 127.0.0.1:15024, is one that other
	// packages' agents may hold while this one runs.
	agent := exec.CommandContext(ctx, bin, "agent", "--ca-address", caAddr, "--ca-server-name", "localhost",
		"--ca-bundle", bundleFile, "--state-dir", stateDir, "--socket", agentSock, "--listen-monitoring", "")
	agent.Env = append(os.Environ(), "TRUSTMESH_JOIN_TOKEN=")
	var agentOut lockedBuffer
	agent.Stdout, agent.Stderr = &agentOut, &agentOut
	if err := agent.Start(); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return strings.Contains(agentOut.String(), "restored saved identity") }, &agentOut)
	if !strings.Contains(agentOut.String(), agentID) {
		t.Errorf("the agent restored another identity:\n%s", agentOut.String())
	}
	_ = agent.Process.Signal(os.Interrupt)
	_ = agent.Wait()

	// It renews over the wire with the old key and certificate, as the
	// agent does at half-life, and keeps its SPIFFE ID.
	renewed := renew(t, ctx, caAddr, roots, key, chain)
	verify(t, renewed, roots)
	if got := renewed[0].URIs; len(got) != 1 || got[0].String() != agentID {
		t.Fatalf("renewed certificate names %v, want %s", got, agentID)
	}

	// The journal holds the renewal and still verifies.
	out := run(t, "audit", "verify", "--data-dir", data)
	if !strings.Contains(out, "OK") {
		t.Fatalf("audit verify after the upgrade: %s", out)
	}
	if !strings.Contains(run(t, "audit", "log", "--data-dir", data), strings.ToLower(renewed[0].SerialNumber.Text(16))) {
		t.Errorf("the renewal is not in the journal")
	}
}

func loadSVID(t *testing.T, path string) (crypto.Signer, []*x509.Certificate) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var key crypto.Signer
	var chain []*x509.Certificate
	for rest := b; ; {
		var blk *pem.Block
		if blk, rest = pem.Decode(rest); blk == nil {
			break
		}
		switch blk.Type {
		case "PRIVATE KEY":
			k, err := x509.ParsePKCS8PrivateKey(blk.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			key = k.(crypto.Signer)
		case "CERTIFICATE":
			c, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				t.Fatal(err)
			}
			chain = append(chain, c)
		}
	}
	if key == nil || len(chain) == 0 {
		t.Fatalf("%s holds no key and chain", path)
	}
	return key, chain
}

func verify(t *testing.T, chain []*x509.Certificate, roots *x509.CertPool) {
	t.Helper()
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageAny}}); err != nil {
		t.Fatalf("certificate %s does not verify: %v", chain[0].SerialNumber.Text(16), err)
	}
}

func renew(t *testing.T, ctx context.Context, caAddr string, roots *x509.CertPool, key crypto.Signer, chain []*x509.Certificate) []*x509.Certificate {
	t.Helper()
	cert := tls.Certificate{PrivateKey: key}
	for _, c := range chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: roots, ServerName: "localhost", Certificates: []tls.Certificate{cert},
	})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		t.Fatalf("renewal by the old certificate: %v", err)
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
	if len(out) < 2 {
		t.Fatalf("the renewed chain holds %d certificates", len(out))
	}
	return out[:len(out)-1]
}

// waitFor polls ok for 30 s; out is the process output to show on failure.
func waitFor(t *testing.T, ok func() bool, out fmt.Stringer) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out:\n%s", out.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// lockedBuffer is a process's output, read while the process writes it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
