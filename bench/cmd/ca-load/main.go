// Command ca-load drives a running trustmesh CA over its wire API, the way
// shared/bench's spiffe-mint-load drives SPIRE's mint API, so that make
// bench can set the two side by side: -c workers call back to back (closed
// loop), each with a fresh ECDSA P-256 key and CSR per call. Each worker
// enrols once with a join token, then renews over mTLS with its current
// certificate: the steady-state operation of a mesh CA, with authentication,
// the durable journal and the self-check included. After each renewal a
// worker presents the certificate it was just issued, as an agent does (it
// reconnects when its certificate changes), so every renewal makes the CA
// verify a client chain it has not seen: its verified-chain cache does not
// answer for it. That takes a TLS handshake per renewal. With -same-chain a
// worker keeps one connection, authenticated with the certificate it
// enrolled with, as a client of SPIRE's admin socket keeps one (the old
// behaviour: the CA's cache answers every renewal after the first); with
// -handshake-per-call it dials a fresh connection for each renewal whatever
// it presents. It prints one JSON line.
//
// The no-op floor is the same client against a CA that does nothing: run
// `ca-load -serve-noop ADDR -data-dir DIR` (it serves until killed), then
// `ca-load -mode noop-floor -addr ADDR -data-dir DIR`. The no-op server
// speaks the same service over the same transport (TLS 1.3, a client
// certificate requested, HTTP/2), takes the same messages and answers each
// with one canned chain made at start, so that what trustmesh adds to it is
// the CA's own work. Without -same-chain the floor's workers also reconnect
// after each call (presenting the canned chain, which holds no requested
// key), so that the floor pays the handshakes trustmesh's workers pay.
//
// The signing floor sits between the two: `ca-load -serve-noop ADDR -sign
// -data-dir DIR`, then `ca-load -mode sign-floor ...`. That server checks
// each CSR's signature and signs a leaf for its key with crypto/x509, as
// spiffe-mint-load's in-process CA does, and does nothing else (no
// authentication, no record). Its rate over the no-op floor's is the most
// that a CA which checks the CSR and signs with crypto/x509 (which verifies
// each signature it makes) can reach on this transport and machine,
// whatever else it does.
//
// With -server-pid, the JSON line also carries the server's CPU time per
// certificate, from /proc/<pid>/stat across the measured window; it always
// carries the load generator's own, since both sides share the machine and
// throughput follows their sum. -conns N (with -same-chain) shares N kept
// connections among the workers, as spiffe-mint-load's -conns does (its
// default is one for all): what a node agent multiplexing its renewals over
// one connection does.
package main

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/authn"
)

type summary struct {
	Tool             string  `json:"tool"`
	Target           string  `json:"target"`
	Mode             string  `json:"mode"`
	HandshakePerCall bool    `json:"handshake_per_call"`
	SameChain        bool    `json:"same_chain"`
	Concurrency      int     `json:"concurrency"`
	DurationS        float64 `json:"duration_s"`
	OK               int64   `json:"ok"`
	Errors           int64   `json:"errors"`
	FirstError       string  `json:"first_error,omitempty"`
	RPS              float64 `json:"rps"`
	P50us            float64 `json:"p50_us"`
	P99us            float64 `json:"p99_us"`
	P999us           float64 `json:"p999_us"`
	// ServerCPUus is the server's user+system CPU time per certificate
	// over the measured window, when -server-pid names it.
	ServerCPUus float64 `json:"server_cpu_us_per_cert,omitempty"`
	// ClientCPUus is this load generator's own user+system CPU time per
	// certificate over the measured window (its set-up, the enrolments,
	// left out): the client's share of a machine both sides run on.
	ClientCPUus float64 `json:"client_cpu_us_per_cert,omitempty"`
}

// Modes.
const (
	modeRenew = "renew"
	modeNoop  = "noop-floor"
	modeSign  = "sign-floor"
)

type options struct {
	addr, dataDir, mode string
	conc                int
	dur                 time.Duration
	handshakePerCall    bool
	sameChain           bool
	serverPID           int
	conns               int
}

func main() {
	var o options
	flag.StringVar(&o.addr, "addr", "127.0.0.1:15012", "the CA's address")
	flag.StringVar(&o.dataDir, "data-dir", "", "the CA's data directory, for join tokens and its bundle; for the no-op floor, the no-op server's (required)")
	flag.StringVar(&o.mode, "mode", modeRenew, "renew: renewals against trustmesh; noop-floor: the same calls against a no-op server (-serve-noop); sign-floor: against a signing one (-serve-noop -sign)")
	flag.IntVar(&o.conc, "c", 1, "concurrent workers")
	flag.DurationVar(&o.dur, "d", 10*time.Second, "measured duration")
	flag.BoolVar(&o.handshakePerCall, "handshake-per-call", false, "dial a fresh TLS connection for every call instead of keeping one per worker")
	flag.BoolVar(&o.sameChain, "same-chain", false, "present the enrolment certificate on every renewal over one kept connection, instead of the certificate just issued: after the first renewal the CA's cache of the verified chain and of the journal's proven record of its certificate answers, while the enrolment is still checked and the renewal journalled durably every call. This is the issue's kept connection, what a node agent delegating over one connection costs; without it, each renewal is what a per-pod agent renewing with its new certificate costs (the handshake-per-renewal point)")
	flag.IntVar(&o.conns, "conns", 0, "with -same-chain: the number of kept connections the workers share, worker i using connection i mod conns and its enrolment, as spiffe-mint-load's -conns spreads its workers; 0 keeps one connection per worker")
	flag.IntVar(&o.serverPID, "server-pid", 0, "the server's process id, to report its CPU time per certificate from /proc")
	serveNoop := flag.String("serve-noop", "", "serve a no-op CA on this address, writing its client material to -data-dir, until killed")
	sign := flag.Bool("sign", false, "with -serve-noop: check each CSR's signature and sign a leaf for its key, and nothing more (the signing floor)")
	flag.Parse()
	if *serveNoop != "" {
		if o.dataDir == "" {
			fmt.Fprintln(os.Stderr, "ca-load: -serve-noop needs -data-dir")
			os.Exit(2)
		}
		if err := serveNoopCA(*serveNoop, o.dataDir, *sign); err != nil {
			fmt.Fprintln(os.Stderr, "ca-load:", err)
			os.Exit(1)
		}
		return
	}
	if *sign {
		fmt.Fprintln(os.Stderr, "ca-load: -sign goes with -serve-noop")
		os.Exit(2)
	}
	if o.dataDir == "" || o.conc < 1 || o.dur <= 0 || (o.mode != modeRenew && o.mode != modeNoop && o.mode != modeSign) {
		fmt.Fprintln(os.Stderr, "ca-load: -data-dir is required; -c and -d must be positive; -mode is renew, noop-floor or sign-floor")
		os.Exit(2)
	}
	if o.conns < 0 || o.conns > o.conc || (o.conns > 0 && (!o.sameChain || o.handshakePerCall)) {
		fmt.Fprintln(os.Stderr, "ca-load: -conns must be in 0..c, and needs -same-chain without -handshake-per-call (a worker that presents each new certificate needs a connection of its own)")
		os.Exit(2)
	}
	if err := run(o); err != nil {
		fmt.Fprintln(os.Stderr, "ca-load:", err)
		os.Exit(1)
	}
}

type worker struct {
	addr  string
	roots *x509.CertPool
	// checkKey is false against the no-op floor, whose canned chain does
	// not hold the requested key; the signing floor's leaf holds it.
	checkKey bool
	// sameChain keeps the enrolment key and chain; otherwise each renewal
	// replaces them and marks the connection stale.
	sameChain bool
	key       *ecdsa.PrivateKey
	chain     [][]byte
	// stale says the connection presents an older certificate than chain
	// (or, against the floor, that a renewal was made since it was dialled).
	stale  bool
	client pb.IstioCertificateServiceClient
	conn   *grpc.ClientConn
}

func run(o options) error {
	ctx := context.Background()
	workers := make([]*worker, o.conc)
	var en *enrolments
	if o.mode == modeRenew {
		n := o.conc
		if o.conns > 0 {
			n = o.conns
		}
		var err error
		if en, err = prepareEnrolments(ctx, o.dataDir, n); err != nil {
			return err
		}
	}
	for i := range workers {
		if o.conns > 0 && i >= o.conns {
			// Shares connection i mod conns, and the identity it
			// presents: nothing of it changes under -same-chain.
			workers[i] = workers[i%o.conns]
			continue
		}
		w, err := newWorker(ctx, o, i, en)
		if err != nil {
			return err
		}
		defer w.close()
		workers[i] = w
	}
	var ok, failed atomic.Int64
	var firstErr atomic.Value
	lat := make([][]time.Duration, o.conc)
	cpu0, err := processCPU(o.serverPID)
	if err != nil {
		return err
	}
	self0, err := processCPU(os.Getpid())
	if err != nil {
		return err
	}
	deadline := time.Now().Add(o.dur)
	start := time.Now()
	var wg sync.WaitGroup
	for i, w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(deadline) {
				t0 := time.Now()
				var err error
				if o.handshakePerCall || w.stale {
					err = w.dialAndCall(ctx)
				} else {
					err = w.call(ctx)
				}
				if err != nil {
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
	cpu1, err := processCPU(o.serverPID)
	if err != nil {
		return err
	}
	self1, err := processCPU(os.Getpid())
	if err != nil {
		return err
	}
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
	s := summary{Tool: "ca-load", Target: o.addr, Mode: o.mode, HandshakePerCall: o.handshakePerCall, SameChain: o.sameChain, Concurrency: o.conc,
		DurationS: elapsed, OK: ok.Load(), Errors: failed.Load(),
		RPS: float64(ok.Load()) / elapsed, P50us: pct(0.5), P99us: pct(0.99), P999us: pct(0.999)}
	if o.serverPID != 0 && s.OK > 0 {
		s.ServerCPUus = float64((cpu1 - cpu0).Microseconds()) / float64(s.OK)
	}
	if s.OK > 0 {
		s.ClientCPUus = float64((self1 - self0).Microseconds()) / float64(s.OK)
	}
	if v, _ := firstErr.Load().(string); v != "" {
		s.FirstError = v
	}
	return json.NewEncoder(os.Stdout).Encode(s)
}

// enrolments are the trust bundle and one join token per enrolling worker,
// made with one opening of the data directory's journal: each opening
// checks the whole log, whose length grows with every point a benchmark
// run has measured.
type enrolments struct {
	roots  *x509.CertPool
	ids    []spiffeid.ID
	tokens []string
}

func prepareEnrolments(ctx context.Context, dataDir string, n int) (*enrolments, error) {
	dir := admin.DataDir(dataDir)
	// TrustBundle refuses a data directory that trustmesh serve has not set
	// up, before OpenJournal could create anything in it.
	b, err := admin.TrustBundle(ctx, dir, admin.JournalOptions{}, "")
	if err != nil {
		return nil, err
	}
	en := &enrolments{roots: x509.NewCertPool()}
	for _, c := range b.X509Authorities() {
		en.roots.AddCert(c)
	}
	store, td, err := dir.OpenJournal(ctx, b.TrustDomain().Name(), admin.JournalOptions{}, false)
	if err != nil {
		return nil, err
	}
	defer store.Close()
	jt := &authn.JoinTokens{TrustDomain: td, Store: store, Clock: clock.RealClock{}}
	for i := range n {
		id := spiffeid.RequireFromPath(td, fmt.Sprintf("/bench/w%d", i))
		tok, _, err := jt.Create(ctx, id, 10*time.Minute)
		if err != nil {
			return nil, fmt.Errorf("join token for %s: %w", id, err)
		}
		en.ids, en.tokens = append(en.ids, id), append(en.tokens, tok)
	}
	return en, nil
}

// newWorker enrols worker i with trustmesh (en), or takes the no-op or
// signing server's client certificate, and opens the connection it keeps.
func newWorker(ctx context.Context, o options, i int, en *enrolments) (*worker, error) {
	w := &worker{addr: o.addr, checkKey: o.mode != modeNoop, sameChain: o.sameChain}
	if o.mode != modeRenew {
		m, err := readNoopMaterial(o.dataDir)
		if err != nil {
			return nil, err
		}
		w.roots, w.key, w.chain = m.roots, m.key, m.chain
	} else {
		w.roots = en.roots
		if err := w.enrol(ctx, en.tokens[i]); err != nil {
			return nil, fmt.Errorf("enrol %s: %w", en.ids[i], err)
		}
	}
	if err := w.dial(); err != nil {
		return nil, err
	}
	return w, nil
}

// enrol obtains the worker's first certificate with a join token.
func (w *worker) enrol(ctx context.Context, token string) error {
	conn, err := grpc.NewClient(w.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: w.roots, ServerName: "localhost"})))
	if err != nil {
		return err
	}
	defer conn.Close()
	w.client = pb.NewIstioCertificateServiceClient(conn)
	return w.call(metadata.AppendToOutgoingContext(ctx, "authorization", "Bearer "+token))
}

// dial opens a connection authenticated with the worker's certificate.
func (w *worker) dial() error {
	cert := tls.Certificate{Certificate: w.chain, PrivateKey: w.key}
	conn, err := grpc.NewClient(w.addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: w.roots, ServerName: "localhost", Certificates: []tls.Certificate{cert}})))
	if err != nil {
		return err
	}
	w.conn, w.client, w.stale = conn, pb.NewIstioCertificateServiceClient(conn), false
	return nil
}

func (w *worker) close() {
	if w.conn != nil {
		w.conn.Close()
	}
}

// dialAndCall renews over a connection of its own: a full TLS handshake,
// client certificate included, then the call.
func (w *worker) dialAndCall(ctx context.Context) error {
	w.close()
	if err := w.dial(); err != nil {
		return err
	}
	err := w.call(ctx)
	w.close()
	w.conn = nil
	return err
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
	if len(resp.CertChain) < 2 {
		return fmt.Errorf("the response holds %d certificates, want a leaf, its chain and a root", len(resp.CertChain))
	}
	// As spiffe-mint-load, parse only the leaf. The rest of the chain is
	// only decoded from PEM, and only when the worker keeps it to present.
	leafDER, err := certDER(resp.CertChain[0])
	if err != nil {
		return err
	}
	leaf, err := x509.ParseCertificate(leafDER)
	if err != nil {
		return err
	}
	keep := w.chain == nil || !w.sameChain
	var chain [][]byte
	if keep {
		chain = [][]byte{leafDER}
		for _, p := range resp.CertChain[1 : len(resp.CertChain)-1] {
			der, err := certDER(p)
			if err != nil {
				return err
			}
			chain = append(chain, der)
		}
	}
	if !w.checkKey {
		// The floor's canned chain holds no requested key: it keeps
		// presenting its own, but reconnects as trustmesh's workers do.
		if !w.sameChain {
			w.stale = true
		}
		return nil
	}
	if !key.PublicKey.Equal(leaf.PublicKey) {
		return errors.New("the certificate does not hold the requested key")
	}
	if keep {
		w.key, w.chain, w.stale = key, chain, true
	}
	return nil
}

// certDER is the DER of the one PEM certificate p holds.
func certDER(p string) ([]byte, error) {
	b, rest := pem.Decode([]byte(p))
	if b == nil || b.Type != "CERTIFICATE" || len(bytes.TrimSpace(rest)) != 0 {
		return nil, errors.New("the response's chain holds an element that is not one PEM certificate")
	}
	return b.Bytes, nil
}
