package disk_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/test/internal/binary"
)

var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "faults-disk-bin-")
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

// runProg runs a program and returns its standard output.
func runProg(t *testing.T, prog string, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(prog, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("%s %s: %v\n%s%s", prog, strings.Join(args, " "), err, stdout.String(), stderr.String())
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

// outcome is one request of a burst: when it returned, and what.
type outcome struct {
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
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				got, err := w.request(ctx, caAddr, roots, "")
				cancel()
				out <- outcome{at: time.Now(), cert: got, err: err}
				if err != nil {
					time.Sleep(50 * time.Millisecond)
				}
			}
		}()
	}
	return &wg
}
