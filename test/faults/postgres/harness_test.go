package postgres_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/internal/binary"
)

var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "faults-postgres-bin-")
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

// postgres is a PostgreSQL cluster of the test's own, on a port chosen at
// run time: never the shared server of make test, which the test kills.
type postgres struct {
	t     *testing.T
	state string
	port  string
	dsn   string
}

func startPostgres(t *testing.T) *postgres {
	t.Helper()
	// Under /tmp itself, not t.TempDir(): as root the cluster runs as the
	// postgres user, who cannot enter the test's owner-only directories.
	parent, err := os.MkdirTemp("", "faults-pg-")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	p := &postgres{t: t, state: filepath.Join(parent, "pg"), port: freeport.Addr(t)}
	_, p.port, _ = net.SplitHostPort(p.port)
	t.Cleanup(func() {
		p.pgctl("stop", "-m", "immediate", "-w")
		os.RemoveAll(parent)
	})
	cmd := exec.Command("../../../hack/postgres.sh", "start")
	cmd.Env = append(os.Environ(), "TRUSTMESH_PG_DIR="+p.state, "TRUSTMESH_PG_PORT="+p.port)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("hack/postgres.sh start: %v\n%s", err, stderr.String())
	}
	p.dsn = strings.TrimSpace(string(out))
	return p
}

// pgctl runs pg_ctl on the cluster as hack/postgres.sh does.
func (p *postgres) pgctl(args ...string) error {
	bins, _ := filepath.Glob("/usr/lib/postgresql/*/bin/pg_ctl")
	if len(bins) == 0 {
		return fmt.Errorf("pg_ctl not found")
	}
	argv := append([]string{bins[len(bins)-1], "-D", filepath.Join(p.state, "data")}, args...)
	if os.Getuid() == 0 {
		argv = append([]string{"runuser", "-u", "postgres", "--"}, argv...)
	}
	out, err := exec.Command(argv[0], argv[1:]...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("pg_ctl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return nil
}

// kill SIGKILLs the postmaster, as a crash or the OOM killer would.
func (p *postgres) kill() {
	p.t.Helper()
	b, err := os.ReadFile(filepath.Join(p.state, "data", "postmaster.pid"))
	if err != nil {
		p.t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.SplitN(string(b), "\n", 2)[0])
	if err != nil {
		p.t.Fatal(err)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		p.t.Fatal(err)
	}
}

// restart starts the killed cluster again on its data, after crash
// recovery. Backends orphaned by the kill may hold its shared memory for a
// moment: it is retried until they are gone.
func (p *postgres) restart() {
	p.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		err := p.pgctl("start", "-w", "-l", filepath.Join(p.state, "server.log"),
			"-o", "-c listen_addresses=127.0.0.1 -p "+p.port+" -k "+p.state+" -c max_connections=200")
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			p.t.Fatal(err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// sharedCA is what replicas on one journal share: an operator-supplied CA
// (--cacerts) and the checkpoint key (--checkpoint-key-uri).
type sharedCA struct {
	cacerts string
	ckptURI string
	roots   *x509.CertPool
}

func newSharedCA(t *testing.T) sharedCA {
	t.Helper()
	dir := t.TempDir()
	files, err := authority.NewSelfManagedFiles(spiffeid.RequireTrustDomainFromString("cluster.local"), time.Now(), authority.Lifetimes{})
	if err != nil {
		t.Fatal(err)
	}
	s := sharedCA{cacerts: filepath.Join(dir, "cacerts"), roots: x509.NewCertPool()}
	if err := os.Mkdir(s.cacerts, 0o700); err != nil {
		t.Fatal(err)
	}
	for name, b := range files {
		if name == authority.RootKeyFile {
			continue
		}
		if err := os.WriteFile(filepath.Join(s.cacerts, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if !s.roots.AppendCertsFromPEM(files[authority.RootCertFile]) {
		t.Fatal("no root")
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(dir, "checkpoint.key")
	if err := authority.WriteKeyFile(keyPath, key); err != nil {
		t.Fatal(err)
	}
	if s.ckptURI, err = authority.SoftKMSURI(keyPath); err != nil {
		t.Fatal(err)
	}
	return s
}

// journalFlags are the flags that name the shared journal, for serve and
// for the operator commands.
func (s sharedCA) journalFlags(dataDir, dsn string) []string {
	return []string{"--data-dir", dataDir, "--journal-dsn", dsn, "--checkpoint-key-uri", s.ckptURI}
}

// lockedBuffer is a process's stderr, read while the process writes it.
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

type serveProc struct {
	cmd            *exec.Cmd
	ca, monitoring string
	stderr         lockedBuffer
}

// startServe runs `trustmesh serve` with extra flags and waits until it is
// ready.
func startServe(t *testing.T, extra ...string) *serveProc {
	t.Helper()
	p := &serveProc{ca: freeport.Addr(t), monitoring: freeport.Addr(t)}
	args := append([]string{"serve", "--listen-ca", p.ca, "--listen-monitoring", p.monitoring,
		"--listen-bundle", "", "--listen-ui", "off", "--kubernetes", "off", "--decision-log", ""}, extra...)
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.cmd.Process.Kill(); _ = p.cmd.Wait() })
	deadline := time.Now().Add(45 * time.Second)
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
		time.Sleep(50 * time.Millisecond)
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

// run runs a trustmesh command and returns its standard output.
func run(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("trustmesh %s: %v\n%s%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// workload enrols with a join token, then renews with its certificate over
// mTLS, as an agent does.
type workload struct {
	key   crypto.Signer
	chain []*x509.Certificate
}

func newWorkload() *workload {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	return &workload{key: key}
}

// received is a certificate a client was given: its serial and the SHA-256
// of its DER, as the journal records them.
type received struct {
	serial, sha256 string
}

// request asks caAddr for a certificate, by token when one is given and
// otherwise by the current certificate.
func (w *workload) request(ctx context.Context, caAddr string, roots *x509.CertPool, token string) (received, error) {
	cfg := &tls.Config{RootCAs: roots, ServerName: "localhost"}
	if token == "" {
		cert := tls.Certificate{PrivateKey: w.key}
		for _, c := range w.chain {
			cert.Certificate = append(cert.Certificate, c.Raw)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		return received{}, err
	}
	defer conn.Close()
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, w.key)
	if err != nil {
		return received{}, err
	}
	if token != "" {
		ctx = metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token)
	}
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		return received{}, err
	}
	var chain []*x509.Certificate
	for _, p := range resp.CertChain {
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			return received{}, fmt.Errorf("a certificate of the chain is not PEM")
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			return received{}, err
		}
		chain = append(chain, c)
	}
	if len(chain) < 2 {
		return received{}, fmt.Errorf("the chain holds %d certificates", len(chain))
	}
	w.chain = chain[:len(chain)-1]
	sum := sha256.Sum256(chain[0].Raw)
	return received{serial: ca.SerialHex(chain[0]), sha256: hex.EncodeToString(sum[:])}, nil
}

// outcome is one request of a burst: when it was sent, when it returned,
// and what.
type outcome struct {
	sent time.Time
	at   time.Time
	cert received
	err  error
}

// burst runs one goroutine per workload, each renewing as fast as the CA
// answers until stop closes; a failed request is retried after a pause.
// It returns the outcomes once every goroutine has stopped.
func burst(caAddr string, roots *x509.CertPool, ws []*workload, stop <-chan struct{}, out chan<- outcome) *sync.WaitGroup {
	var wg sync.WaitGroup
	for _, w := range ws {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				select {
				case <-stop:
					return
				default:
				}
				sent := time.Now()
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				got, err := w.request(ctx, caAddr, roots, "")
				cancel()
				out <- outcome{sent: sent, at: time.Now(), cert: got, err: err}
				if err != nil {
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	return &wg
}

// enrol gives each of n workloads its first certificate by join token.
func enrol(t *testing.T, n int, caAddr string, roots *x509.CertPool, tokenArgs []string) []*workload {
	t.Helper()
	var ws []*workload
	for i := range n {
		w := newWorkload()
		id := fmt.Sprintf("spiffe://cluster.local/vm/fault-%d-%d", time.Now().UnixNano()%1e6, i)
		tok := strings.TrimSpace(run(t, append([]string{"ca", "token", "create", "--spiffe-id", id}, tokenArgs...)...))
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		_, err := w.request(ctx, caAddr, roots, tok)
		cancel()
		if err != nil {
			t.Fatalf("enrolling %s: %v", id, err)
		}
		ws = append(ws, w)
	}
	return ws
}
