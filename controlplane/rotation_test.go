package controlplane_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/rotation"
	"github.com/trustmesh/trustmesh/controlplane"
)

// workload is what an agent keeps for a workload: its current certificate,
// and the trust bundle it follows on the CA's bundle stream.
type workload struct {
	id     spiffeid.ID
	c      *client
	cert   atomic.Pointer[tls.Certificate]
	bundle atomic.Pointer[x509bundle.Bundle]
	seq    atomic.Uint64
}

func (w *workload) setCert() {
	cert := &tls.Certificate{PrivateKey: w.c.key, Leaf: w.c.chain[0]}
	for _, c := range w.c.chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	w.cert.Store(cert)
}

// follow keeps the workload's bundle current from the CA's stream.
func (w *workload) follow(ctx context.Context, t *testing.T, e *env) {
	roots := x509.NewCertPool()
	roots.AddCert(e.cp.Authority().Current().Roots[0])
	conn, err := grpc.NewClient(e.cp.Addrs().CA.String(), grpc.WithTransportCredentials(credentials.NewTLS(
		&tls.Config{RootCAs: roots, ServerName: "localhost", Time: e.clock.Now})))
	if err != nil {
		t.Error(err)
		return
	}
	defer conn.Close()
	stream, err := cav1.NewTrustBundleServiceClient(conn).WatchBundle(ctx, &cav1.WatchBundleRequest{})
	if err != nil {
		t.Error(err)
		return
	}
	for {
		b, err := stream.Recv()
		if err != nil {
			return
		}
		var certs []*x509.Certificate
		for _, der := range b.X509Authorities {
			c, err := x509.ParseCertificate(der)
			if err != nil {
				t.Error(err)
				return
			}
			certs = append(certs, c)
		}
		w.bundle.Store(x509bundle.FromX509Authorities(w.id.TrustDomain(), certs))
		w.seq.Store(b.SequenceNumber)
	}
}

// verifyPeer checks the peer's SVID against the workload's current bundle,
// at the control plane's clock.
func (w *workload) verifyPeer(e *env) func([][]byte, [][]*x509.Certificate) error {
	return func(raw [][]byte, _ [][]*x509.Certificate) error {
		_, _, err := x509svid.ParseAndVerify(raw, w.bundle.Load(), x509svid.WithTime(e.clock.Now()))
		return err
	}
}

// TestRotationUnderTraffic rotates the intermediate and then the root while
// two workloads make mTLS handshakes back to back: not one may fail.
func TestRotationUnderTraffic(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	e := start(t, func(c *controlplane.Config) { c.Rotation.Manual = true })
	mgr := e.cp.Rotation()
	apply := func() {
		t.Helper()
		if err := mgr.Reload(ctx, e.cp.Authority().Replace); err != nil {
			t.Fatal(err)
		}
	}
	var streams sync.WaitGroup
	defer streams.Wait()
	defer cancel()
	newWorkload := func(path string) *workload {
		w := &workload{id: spiffeid.RequireFromString("spiffe://cluster.local" + path), c: newClient(t)}
		e.obtain(w.c, e.token(w.id, time.Minute), w.id)
		w.setCert()
		b, _ := e.cp.Authority().Bundle()
		xb, _ := b.GetX509BundleForTrustDomain(w.id.TrustDomain())
		w.bundle.Store(xb)
		streams.Add(1)
		go func() { defer streams.Done(); w.follow(ctx, t, e) }()
		return w
	}
	server, clientW := newWorkload("/ns/shop/sa/server"), newWorkload("/ns/shop/sa/client")

	lis, err := tls.Listen("tcp", "127.0.0.1:0", &tls.Config{
		GetCertificate:        func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return server.cert.Load(), nil },
		ClientAuth:            tls.RequireAnyClientCert,
		VerifyPeerCertificate: server.verifyPeer(e),
		MinVersion:            tls.VersionTLS13,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	go func() {
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			go func() {
				defer conn.Close()
				_ = conn.(*tls.Conn).Handshake()
				_, _ = conn.Write([]byte{1})
			}()
		}
	}()

	var ok, failed atomic.Int64
	var firstErr atomic.Value
	stop := make(chan struct{})
	var calls sync.WaitGroup
	calls.Add(1)
	go func() {
		defer calls.Done()
		cfg := &tls.Config{
			GetClientCertificate:  func(*tls.CertificateRequestInfo) (*tls.Certificate, error) { return clientW.cert.Load(), nil },
			InsecureSkipVerify:    true, // verified below, against the SPIFFE bundle
			VerifyPeerCertificate: clientW.verifyPeer(e),
			MinVersion:            tls.VersionTLS13,
		}
		for i := 0; i < 1_000_000; i++ {
			select {
			case <-stop:
				return
			default:
			}
			conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", lis.Addr().String(), cfg)
			if err == nil {
				buf := make([]byte, 1)
				_, err = conn.Read(buf) // the server answers only after its side of the handshake succeeded
				conn.Close()
			}
			if err != nil {
				failed.Add(1)
				firstErr.CompareAndSwap(nil, err)
				continue
			}
			ok.Add(1)
		}
	}()
	waitCalls := func(n int64) {
		t.Helper()
		target := ok.Load() + n
		deadline := time.Now().Add(30 * time.Second)
		for ok.Load() < target {
			if time.Now().After(deadline) {
				t.Fatalf("handshakes stalled at %d (failed %d: %v)", ok.Load(), failed.Load(), firstErr.Load())
			}
			time.Sleep(time.Millisecond)
		}
	}
	renew := func() {
		for _, w := range []*workload{server, clientW} {
			e.obtain(w.c, "", w.id)
			w.setCert()
		}
	}
	waitCalls(20)
	oldRoot := e.cp.Authority().Current().Anchor

	// The intermediate: prepare, activate, and the workloads renew under it.
	if err := mgr.Prepare(ctx, false); err != nil {
		t.Fatal(err)
	}
	apply()
	waitCalls(20)
	if err := mgr.Activate(ctx, false); err != nil {
		t.Fatal(err)
	}
	apply()
	waitCalls(20)
	renew()
	waitCalls(20)
	if got := server.c.chain[1]; got.Equal(e.cp.Authority().Current().Chain[0]) == false {
		t.Fatal("the renewed certificate is not signed by the new intermediate")
	}

	// The root: the new root reaches both workloads before it signs anything.
	if err := mgr.Prepare(ctx, true); err != nil {
		t.Fatal(err)
	}
	apply()
	b, _ := e.cp.Authority().Bundle()
	want, _ := b.SequenceNumber()
	for _, w := range []*workload{server, clientW} {
		deadline := time.Now().Add(30 * time.Second)
		for w.seq.Load() < want {
			if time.Now().After(deadline) {
				t.Fatal("the new root did not reach a workload")
			}
			time.Sleep(time.Millisecond)
		}
	}
	waitCalls(20)
	if err := mgr.Activate(ctx, false); !errors.Is(err, rotation.ErrTooEarly) {
		t.Fatalf("activating a root at once = %v, want ErrTooEarly", err)
	}
	// Both workloads have the new root (checked above): force it.
	if err := mgr.Activate(ctx, true); err != nil {
		t.Fatal(err)
	}
	apply()
	renew()
	waitCalls(20)
	newRoot := e.cp.Authority().Current().Anchor
	if newRoot.Equal(oldRoot) {
		t.Fatal("the root did not change")
	}
	// The CA's own serving certificate follows at once: a client that
	// trusts only the new root can reach it.
	onlyNew := x509.NewCertPool()
	onlyNew.AddCert(newRoot)
	conn, err := tls.Dial("tcp", e.cp.Addrs().CA.String(), &tls.Config{RootCAs: onlyNew, ServerName: "localhost", Time: e.clock.Now, NextProtos: []string{"h2"}})
	if err != nil {
		t.Fatalf("the CA still serves a certificate under the old root: %v", err)
	}
	conn.Close()
	// Only one workload has renewed under the new root: old and new chains
	// must interoperate while the old root is retiring.
	e.obtain(server.c, "", server.id)
	server.setCert()
	waitCalls(20)
	close(stop)
	calls.Wait()
	if n := failed.Load(); n != 0 {
		t.Fatalf("%d of %d handshakes failed during rotation; first: %v", n, n+ok.Load(), firstErr.Load())
	}
	t.Logf("%d handshakes, none failed", ok.Load())

	rep, err := admin.AuditRotation(ctx, admin.DataDir(e.dataDir), admin.JournalOptions{}, e.clock.Now(), 24*time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	states := map[string]string{}
	for _, c := range rep.CA {
		if c.Role == "root" {
			states[c.Serial] = c.State
		}
	}
	if states[newRoot.SerialNumber.Text(16)] != "active" || states[oldRoot.SerialNumber.Text(16)] != "retiring" {
		t.Fatalf("audit rotation reports roots %v; want the new one active and the old one retiring", states)
	}
	if errors.Is(ctx.Err(), context.Canceled) {
		t.Fatal("context ended early")
	}
}

// operatorCA writes a CA in Istio's cacerts layout, as an operator would.
func operatorCA(t *testing.T, now time.Time) string {
	t.Helper()
	files, err := authority.NewSelfManagedFiles(spiffeid.RequireTrustDomainFromString("cluster.local"), now, authority.Lifetimes{Intermediate: 30 * 24 * time.Hour})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	for _, name := range []string{authority.CACertFile, authority.CAKeyFile, authority.CertChainFile, authority.RootCertFile} {
		if err := os.WriteFile(filepath.Join(dir, name), files[name], 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// Operator-supplied material is staged and activated like self-managed
// material, and its keys are never copied into the data directory.
func TestStageOperatorCACerts(t *testing.T) {
	ctx := context.Background()
	first := operatorCA(t, time.Now())
	e := start(t, func(c *controlplane.Config) {
		c.CA.CertsDir = first
		c.Rotation.Manual = true
	})
	c := newClient(t)
	e.obtain(c, e.token(vmID, time.Minute), vmID)
	oldRoot := e.cp.Authority().Current().Anchor

	second := operatorCA(t, e.clock.Now())
	if _, err := admin.Rotate(ctx, admin.DataDir(e.dataDir), e.jo, admin.RotateRequest{Step: "prepare", CACertsDir: second}); err != nil {
		t.Fatal(err)
	}
	if err := e.cp.Rotation().Reload(ctx, e.cp.Authority().Replace); err != nil {
		t.Fatal(err)
	}
	if n := len(e.cp.Authority().Current().Roots); n != 2 {
		t.Fatalf("bundle has %d roots after staging a new root; want 2", n)
	}
	if !e.cp.Authority().Current().Anchor.Equal(oldRoot) {
		t.Fatal("the staged CA signs before it is activated")
	}
	st, err := admin.Rotate(ctx, admin.DataDir(e.dataDir), e.jo, admin.RotateRequest{Step: "activate", Force: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := e.cp.Rotation().Reload(ctx, e.cp.Authority().Replace); err != nil {
		t.Fatal(err)
	}
	e.obtain(c, "", vmID) // renewing with a certificate under the retiring root
	if !c.chain[1].Equal(e.cp.Authority().Current().Cert) || e.cp.Authority().Current().Anchor.Equal(oldRoot) {
		t.Fatal("the activated CA does not sign")
	}
	var states []string
	for _, ca := range st.CA {
		if ca.Role == "root" {
			states = append(states, ca.State)
		}
	}
	if len(states) != 2 {
		t.Fatalf("rotation status shows roots %v; want the new active and the old retiring", states)
	}
	err = filepath.WalkDir(e.dataDir, func(path string, d os.DirEntry, err error) error {
		if err == nil && strings.HasSuffix(path, "key.pem") && !strings.HasSuffix(path, "checkpoint-key.pem") {
			t.Errorf("the data directory holds a CA key: %s", path)
		}
		return err
	})
	if err != nil {
		t.Fatal(err)
	}
}
