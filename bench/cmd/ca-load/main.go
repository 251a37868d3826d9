// Command ca-load drives a running trustmesh CA over its wire API, the way
// shared/bench's spiffe-mint-load drives SPIRE's mint API, so that make
// bench can set the two side by side: -c workers call back to back (closed
// loop), each with a fresh ECDSA P-256 key and CSR per call. Each worker
// enrols once with a join token, then renews over mTLS with its current
// certificate: the steady-state operation of a mesh CA, with authentication,
// the durable journal and the self-check included. A worker keeps one
// connection, authenticated with the certificate it enrolled with, as a
// client of SPIRE's admin socket keeps one. It prints one JSON line.
package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/pemutil"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/ca/admin"
)

type summary struct {
	Tool        string  `json:"tool"`
	Target      string  `json:"target"`
	Concurrency int     `json:"concurrency"`
	DurationS   float64 `json:"duration_s"`
	OK          int64   `json:"ok"`
	Errors      int64   `json:"errors"`
	FirstError  string  `json:"first_error,omitempty"`
	RPS         float64 `json:"rps"`
	P50us       float64 `json:"p50_us"`
	P99us       float64 `json:"p99_us"`
}

func main() {
	addr := flag.String("addr", "127.0.0.1:15012", "the CA's address")
	dataDir := flag.String("data-dir", "", "the CA's data directory, for join tokens and its bundle (required)")
	conc := flag.Int("c", 1, "concurrent workers")
	dur := flag.Duration("d", 10*time.Second, "measured duration")
	flag.Parse()
	if *dataDir == "" || *conc < 1 || *dur <= 0 {
		fmt.Fprintln(os.Stderr, "ca-load: -data-dir is required; -c and -d must be positive")
		os.Exit(2)
	}
	if err := run(*addr, *dataDir, *conc, *dur); err != nil {
		fmt.Fprintln(os.Stderr, "ca-load:", err)
		os.Exit(1)
	}
}

type worker struct {
	key    *ecdsa.PrivateKey
	chain  [][]byte
	client pb.IstioCertificateServiceClient
	conn   *grpc.ClientConn
}

func run(addr, dataDir string, conc int, dur time.Duration) error {
	ctx := context.Background()
	dir := admin.DataDir(dataDir)
	b, err := admin.TrustBundle(ctx, dir, admin.JournalOptions{}, "")
	if err != nil {
		return err
	}
	roots := x509.NewCertPool()
	for _, c := range b.X509Authorities() {
		roots.AddCert(c)
	}
	td := b.TrustDomain()
	workers := make([]*worker, conc)
	for i := range workers {
		id := spiffeid.RequireFromPath(td, fmt.Sprintf("/bench/w%d", i))
		tok, err := admin.CreateJoinToken(ctx, dir, admin.JournalOptions{}, id.String(), 10*time.Minute)
		if err != nil {
			return err
		}
		w := &worker{}
		if err := w.enrol(ctx, addr, roots, tok); err != nil {
			return fmt.Errorf("enrol %s: %w", id, err)
		}
		defer w.conn.Close()
		workers[i] = w
	}
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	lat := make([][]time.Duration, conc)
	deadline := time.Now().Add(dur)
	start := time.Now()
	var wg sync.WaitGroup
	for i, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				t0 := time.Now()
				if err := w.call(ctx); err != nil {
					failed.Add(1)
					firstErr.CompareAndSwap(nil, err.Error())
					continue
				}
				if time.Now().Before(deadline) {
					lat[i] = append(lat[i], time.Since(t0))
					ok.Add(1)
				}
			}
		}()
	}
	wg.Wait()
	elapsed := time.Since(start).Seconds()
	var all []time.Duration
	for _, l := range lat {
		all = append(all, l...)
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pct := func(p float64) float64 {
		if len(all) == 0 {
			return 0
		}
		return float64(all[int(p*float64(len(all)-1))].Microseconds())
	}
	s := summary{Tool: "ca-load", Target: addr, Concurrency: conc, DurationS: elapsed, OK: ok.Load(), Errors: failed.Load(),
		RPS: float64(ok.Load()) / elapsed, P50us: pct(0.5), P99us: pct(0.99)}
	if v, _ := firstErr.Load().(string); v != "" {
		s.FirstError = v
	}
	return json.NewEncoder(os.Stdout).Encode(s)
}

// enrol obtains the worker's first certificate with a join token, then
// opens the connection it renews over, authenticated with that certificate.
func (w *worker) enrol(ctx context.Context, addr string, roots *x509.CertPool, token string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost"})))
	if err != nil {
		return err
	}
	w.client = pb.NewIstioCertificateServiceClient(conn)
	err = w.call(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token))
	conn.Close()
	if err != nil {
		return err
	}
	cert := tls.Certificate{Certificate: w.chain, PrivateKey: w.key}
	w.conn, err = grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: roots, ServerName: "localhost", Certificates: []tls.Certificate{cert}})))
	if err != nil {
		return err
	}
	w.client = pb.NewIstioCertificateServiceClient(w.conn)
	return nil
}

// call asks for a certificate with a fresh key and checks that the result
// holds that key, as spiffe-mint-load does.
func (w *worker) call(ctx context.Context) error {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return err
	}
	resp, err := w.client.CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		return err
	}
	var chain [][]byte
	for _, p := range resp.CertChain[:len(resp.CertChain)-1] {
		c, err := pemutil.ParseCertificate([]byte(p))
		if err != nil {
			return err
		}
		chain = append(chain, c.Raw)
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return err
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return fmt.Errorf("the certificate does not hold the requested key")
	}
	if w.chain == nil {
		w.key, w.chain = key, chain
	}
	return nil
}
