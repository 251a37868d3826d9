package node

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/caclient"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

const nodeToken = "node-a-token"

// fakeCA is the CA's node service, in process over real gRPC and TLS: it
// issues what it is asked unless told to misbehave, and counts the calls.
type fakeCA struct {
	cav1.UnimplementedNodeServiceServer
	a     *testca.Authority
	clock clock.Clock
	ttl   time.Duration
	addr  string

	mu        sync.Mutex
	node      string
	entries   []*cav1.Entry
	revision  string
	notOnNode map[string]bool
	// refusal answers a param of that ID with this code and reason.
	refusal  map[string]*cav1.NewX509SVIDResult
	wrongKey bool
	wrongID  bool
	// hang makes BatchNewX509SVID wait for its caller to give up.
	hang    bool
	batches int
	fetches int
	params  int
	asked   map[string]int
}

// newFakeNodeService is the node service alone, for a server of the
// caller's.
func newFakeNodeService(t *testing.T, clk clock.Clock) *fakeCA {
	t.Helper()
	return &fakeCA{
		a:     testca.New(t, td, clk.Now()),
		clock: clk, ttl: time.Hour, node: "node-a",
		notOnNode: map[string]bool{}, asked: map[string]int{},
	}
}

func newFakeCA(t *testing.T, clk *clocktesting.FakeClock) *fakeCA {
	t.Helper()
	f := newFakeNodeService(t, clk)
	cert, err := f.a.ServingCertificate(time.Now(), nil, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS12})),
		grpc.MaxRecvMsgSize(caMaxRecvMsgSize))
	cav1.RegisterNodeServiceServer(g, f)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = lis.Addr().String()
	go func() { _ = g.Serve(lis) }()
	t.Cleanup(g.Stop)
	return f
}

func (f *fakeCA) setEntries(revision string, ids ...spiffeid.ID) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.entries = nil
	for i, id := range ids {
		f.entries = append(f.entries, &cav1.Entry{SpiffeId: id.String(), Selectors: []string{fmt.Sprintf("%s%d", cav1.SelectorUID, 1000+i)}})
	}
	f.revision = revision
}

// nodeSVID is the node's own identity, which authenticates it without a
// token.
var nodeSVID = spiffeid.RequireFromString("spiffe://cluster.local/node/node-a")

// authed accepts the node's token, or its SVID as the client certificate.
func authed(ctx context.Context) error {
	md, _ := metadata.FromIncomingContext(ctx)
	if v := md.Get("authorization"); len(v) == 1 && v[0] == "Bearer "+nodeToken {
		return nil
	}
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
			if id, err := x509svid.IDFromCert(ti.State.VerifiedChains[0][0]); err == nil && id == nodeSVID {
				return nil
			}
		}
	}
	return status.Error(codes.Unauthenticated, "neither the node's token nor its SVID")
}

func (f *fakeCA) FetchEntries(ctx context.Context, _ *cav1.FetchEntriesRequest) (*cav1.FetchEntriesResponse, error) {
	if err := authed(ctx); err != nil {
		return nil, err
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fetches++
	return &cav1.FetchEntriesResponse{Node: f.node, Entries: f.entries, Revision: f.revision}, nil
}

func (f *fakeCA) BatchNewX509SVID(ctx context.Context, req *cav1.BatchNewX509SVIDRequest) (*cav1.BatchNewX509SVIDResponse, error) {
	if err := authed(ctx); err != nil {
		return nil, err
	}
	if len(req.GetParams()) > cav1.MaxBatch {
		return nil, status.Error(codes.InvalidArgument, "batch too large")
	}
	f.mu.Lock()
	f.batches++
	f.params += len(req.GetParams())
	wrongKey, wrongID, hang := f.wrongKey, f.wrongID, f.hang
	f.mu.Unlock()
	if hang {
		<-ctx.Done()
		return nil, status.FromContextError(ctx.Err()).Err()
	}
	resp := &cav1.BatchNewX509SVIDResponse{}
	for _, p := range req.GetParams() {
		f.mu.Lock()
		f.asked[p.GetSpiffeId()]++
		refuse := f.notOnNode[p.GetSpiffeId()]
		refusal := f.refusal[p.GetSpiffeId()]
		f.mu.Unlock()
		if refusal != nil {
			resp.Results = append(resp.Results, &cav1.NewX509SVIDResult{
				Code: refusal.GetCode(), Reason: refusal.GetReason(), Message: refusal.GetMessage(),
			})
			continue
		}
		if refuse {
			resp.Results = append(resp.Results, &cav1.NewX509SVIDResult{
				Code: int32(codes.PermissionDenied), Reason: cav1.NotOnNode, Message: "no workload of it on node-a",
			})
			continue
		}
		csr, err := x509.ParseCertificateRequest(p.GetCsr())
		if err != nil || csr.CheckSignature() != nil {
			resp.Results = append(resp.Results, &cav1.NewX509SVIDResult{Code: int32(codes.InvalidArgument), Message: "bad CSR"})
			continue
		}
		id := spiffeid.RequireFromString(p.GetSpiffeId())
		pub := csr.PublicKey
		if wrongKey {
			k, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			pub = k.Public()
		}
		if wrongID {
			id = spiffeid.RequireFromPath(td, "/ns/evil/sa/thief")
		}
		chain, err := f.a.Issue(pub, id, f.clock.Now(), f.ttl)
		if err != nil {
			return nil, err
		}
		resp.Results = append(resp.Results, &cav1.NewX509SVIDResult{Code: int32(codes.OK), CertChain: [][]byte{chain[0].Raw, chain[1].Raw}})
	}
	return resp, nil
}

func (f *fakeCA) counts() (batches, fetches, params int) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.batches, f.fetches, f.params
}

func (f *fakeCA) askedFor(id spiffeid.ID) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.asked[id.String()]
}

// startHolder runs a holder against f until the test ends (or stop is
// called), with the node's bundle already in place.
func startHolder(t *testing.T, f *fakeCA, reg prometheus.Registerer) (h *Holder, stop func()) {
	t.Helper()
	client, err := caclient.NewNodeClient(caclient.NodeConfig{
		Address: f.addr,
		Roots:   func() []*x509.Certificate { return []*x509.Certificate{f.a.Root} },
		Token:   func() (string, error) { return nodeToken, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	nodeStore := identity.New()
	nodeStore.SetBundle(f.a.Bundle())
	h, err = NewHolder(HolderConfig{
		CA: client, Bundle: nodeStore, NodeName: "node-a", Clock: f.clock, Registerer: reg,
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Run(ctx) }()
	var once sync.Once
	stop = func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != context.Canceled {
					t.Errorf("Run returned %v, want context.Canceled", err)
				}
			case <-time.After(15 * time.Second):
				t.Error("Run did not return after cancel")
			}
			_ = client.Close()
		})
	}
	t.Cleanup(stop)
	return h, stop
}

func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// idle waits until the holder's two loops are both blocked on the clock:
// the sync loop on its next fetch, the issue loop on its next renewal. A
// step taken before that can land between a loop's reading the time and
// its setting a timer, which then fires a step late, or never.
func idle(t *testing.T, clk *clocktesting.FakeClock) {
	t.Helper()
	eventually(t, "both loops waiting on the clock", func() bool { return clk.Waiters() == 2 })
}

// caMaxRecvMsgSize is the CA's gRPC receive limit (controlplane/ca.go).
const caMaxRecvMsgSize = 256 << 10

// A full batch of the longest Kubernetes identities (a 63-character
// namespace, a 253-character service account; each ID sent in its param
// and again in its CSR) is larger than the CA accepts in one request: the
// holder splits it by size, and every identity is held.
func TestHolderSplitsBatchBySize(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	ids := make([]spiffeid.ID, cav1.MaxBatch)
	for i := range ids {
		sa := fmt.Sprintf("%04d", i) + strings.Repeat("s", 249)
		ids[i] = spiffeid.RequireFromPath(td, "/ns/"+strings.Repeat("n", 63)+"/sa/"+sa)
	}
	f.setEntries("r1", ids...)
	h, _ := startHolder(t, f, prometheus.NewRegistry())
	eventually(t, "every long identity held", func() bool { return h.Held() == len(ids) })
	b, _, p := f.counts()
	if b < 2 || p != len(ids) {
		t.Fatalf("%d batch calls for %d params; want at least 2 for %d", b, p, len(ids))
	}
	if err := h.Healthy(); err != nil {
		t.Fatalf("Healthy: %v", err)
	}
}

func workloadIDs(n int) []spiffeid.ID {
	ids := make([]spiffeid.ID, n)
	for i := range ids {
		ids[i] = spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/demo/sa/w%04d", i))
	}
	return ids
}

func serialOf(h *Holder, id spiffeid.ID) string {
	st := h.Store(id)
	if st == nil {
		return ""
	}
	snap, _ := st.Load()
	if snap.SVID == nil {
		return ""
	}
	return snap.SVID.Certificates[0].SerialNumber.String()
}

// 1,000 identities take two BatchNewX509SVID calls at start, and two per
// renewal round, not 1,000.
func TestHolderBatchesIssuanceAndRenewals(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	ids := workloadIDs(1000)
	f.setEntries("r1", ids...)
	reg := prometheus.NewRegistry()
	h, _ := startHolder(t, f, reg)

	eventually(t, "1,000 identities held", func() bool { return h.Held() == 1000 })
	if b, _, p := f.counts(); b != 2 || p != 1000 {
		t.Fatalf("initial issuance: %d batch calls for %d params, want 2 for 1000", b, p)
	}
	if got := metricValue(t, h.batches); got != 2 {
		t.Errorf("trustmesh_node_batch_calls_total = %v, want 2", got)
	}
	if h.FirstFullIssuance() < 0 || metricValue(t, h.fullSecs) < 0 {
		t.Error("negative first full issuance time")
	}
	before := map[spiffeid.ID]string{}
	for _, id := range ids {
		before[id] = serialOf(h, id)
		if before[id] == "" {
			t.Fatalf("%s: no certificate", id)
		}
	}
	for round := 1; round <= 2; round++ {
		// Just before half-life nothing is renewed; at it, everything is.
		idle(t, clk)
		clk.Step(30*time.Minute - 10*time.Minute)
		time.Sleep(100 * time.Millisecond)
		if b, _, _ := f.counts(); b != 2*round {
			t.Fatalf("round %d: %d batch calls before half-life, want %d", round, b, 2*round)
		}
		clk.Step(10 * time.Minute)
		eventually(t, "every identity renewed", func() bool {
			for _, id := range ids {
				if s := serialOf(h, id); s == "" || s == before[id] {
					return false
				}
			}
			return true
		})
		time.Sleep(100 * time.Millisecond)
		if b, _, p := f.counts(); b != 2*(round+1) || p != 1000*(round+1) {
			t.Fatalf("after renewal round %d: %d batch calls for %d params, want %d for %d", round, b, p, 2*(round+1), 1000*(round+1))
		}
		for _, id := range ids {
			before[id] = serialOf(h, id)
		}
	}
	if got := metricValue(t, h.results.WithLabelValues(ResultIssued)); got != 3000 {
		t.Errorf("issued results = %v, want 3000", got)
	}
}

// Renewals due within a tenth of the lifetime of each other share a batch.
func TestHolderCoalescesRenewalsWithinWindow(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	ids := workloadIDs(2)
	f.setEntries("r1", ids[0])
	h, _ := startHolder(t, f, nil)
	eventually(t, "first identity", func() bool { return h.Held() == 1 })
	// The entries change before the clock moves: the step fires the sync
	// timer, and a fetch that ran before the change would find no second
	// identity and wait for the next step, which never comes.
	f.setEntries("r2", ids...)
	idle(t, clk)
	clk.Step(4 * time.Minute) // within 6 minutes (10% of 1h) of the first
	eventually(t, "second identity", func() bool { return h.Held() == 2 })
	if b, _, _ := f.counts(); b != 2 {
		t.Fatalf("%d batch calls, want 2", b)
	}
	idle(t, clk)
	clk.Step(26 * time.Minute) // the first's half-life; the second's is 4 minutes on
	eventually(t, "one renewal round", func() bool { b, _, _ := f.counts(); return b >= 3 })
	time.Sleep(100 * time.Millisecond)
	if b, _, p := f.counts(); b != 3 || p != 4 {
		t.Fatalf("%d batch calls for %d params, want 3 for 4: the second renewal joined the first", b, p)
	}
}

// An identity the CA says is not on the node is dropped, and not asked
// for again until the entries' revision changes.
func TestHolderDropsNotOnNode(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	ids := workloadIDs(2)
	f.notOnNode[ids[1].String()] = true
	// Without a revision, every fetch lists the refused identity again.
	f.setEntries("", ids...)
	reg := prometheus.NewRegistry()
	h, _ := startHolder(t, f, reg)
	eventually(t, "refusal", func() bool { return f.askedFor(ids[1]) == 1 && h.Held() == 1 })
	for range 5 {
		idle(t, clk)
		clk.Step(DefaultSyncInterval)
	}
	idle(t, clk)
	_, fetches, _ := f.counts()
	if fetches < 3 {
		t.Fatalf("only %d fetches", fetches)
	}
	if n := f.askedFor(ids[1]); n != 1 {
		t.Errorf("refused identity asked for %d times under the same revision, want 1", n)
	}
	if h.Store(ids[1]) != nil {
		t.Error("Store returns the refused identity")
	}
	if h.Store(ids[0]) == nil {
		t.Error("the other identity is not held")
	}
	if got := metricValue(t, h.results.WithLabelValues(ResultNotOnNode)); got != 1 {
		t.Errorf("not_on_node results = %v, want 1", got)
	}
	f.mu.Lock()
	delete(f.notOnNode, ids[1].String())
	f.mu.Unlock()
	f.setEntries("r2", ids...)
	idle(t, clk)
	clk.Step(DefaultSyncInterval)
	eventually(t, "the identity back after the entries changed", func() bool { return h.Held() == 2 })
}

// A refusal no retry can change (the control plane's own identity,
// reserved, listed because its pod runs on the node; a node identity;
// another trust domain; a request the CA always refuses) is dropped like
// NOT_ON_NODE: asked for once per revision, and the node stays healthy. A
// refusal that may pass (the CA cannot check now, is overloaded, failed)
// is retried, and the node is unhealthy until it passes (review15-cor F1).
func TestHolderPermanentAndTransientRefusals(t *testing.T) {
	for _, tc := range []struct {
		name      string
		code      codes.Code
		reason    string
		permanent bool
	}{
		{"reserved", codes.PermissionDenied, "reserved-identity", true},
		{"node identity", codes.PermissionDenied, "node-identity", true},
		{"trust domain", codes.PermissionDenied, "trust-domain", true},
		{"delegation off", codes.PermissionDenied, "delegation-off", true},
		{"csr key", codes.InvalidArgument, "csr-key", true},
		{"check unavailable", codes.Unavailable, "node-check-failed", false},
		{"overloaded", codes.ResourceExhausted, "", false},
		{"internal", codes.Internal, "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := clocktesting.NewFakeClock(time.Now())
			f := newFakeCA(t, clk)
			ids := workloadIDs(2)
			f.refusal = map[string]*cav1.NewX509SVIDResult{
				ids[1].String(): {Code: int32(tc.code), Reason: tc.reason, Message: "refused"},
			}
			f.setEntries("r1", ids...)
			h, _ := startHolder(t, f, nil)
			eventually(t, "first round", func() bool { return f.askedFor(ids[1]) >= 1 && h.Held() == 1 })
			for range 10 {
				clk.Step(2 * time.Minute) // past any backoff (capped at a minute)
				time.Sleep(20 * time.Millisecond)
			}
			n := f.askedFor(ids[1])
			if tc.permanent {
				if n != 1 {
					t.Errorf("a permanent refusal was asked for %d times under one revision, want 1", n)
				}
				if err := h.Healthy(); err != nil {
					t.Errorf("unhealthy for a permanent refusal: %v", err)
				}
				if h.Store(ids[1]) != nil {
					t.Error("Store returns the refused identity")
				}
			} else {
				if n < 2 {
					t.Errorf("a transient refusal was asked for %d times, want retries", n)
				}
				if err := h.Healthy(); err == nil {
					t.Error("healthy while an identity is refused and retried")
				}
			}
			// The refusal lifts; a permanent one is asked again when
			// the entries change, a transient one at its next retry.
			f.mu.Lock()
			f.refusal = nil
			f.mu.Unlock()
			if tc.permanent {
				f.setEntries("r2", ids...)
			}
			eventually(t, "both held", func() bool {
				clk.Step(time.Minute)
				return h.Held() == 2
			})
			if err := h.Healthy(); err != nil {
				t.Errorf("unhealthy once both are held: %v", err)
			}
		})
	}
}

// A certificate for another key or another identity is never stored.
func TestHolderRefusesUnverifiedChains(t *testing.T) {
	for _, tc := range []struct {
		name string
		set  func(f *fakeCA, v bool)
	}{
		{"wrong key", func(f *fakeCA, v bool) { f.mu.Lock(); f.wrongKey = v; f.mu.Unlock() }},
		{"wrong identity", func(f *fakeCA, v bool) { f.mu.Lock(); f.wrongID = v; f.mu.Unlock() }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk := clocktesting.NewFakeClock(time.Now())
			f := newFakeCA(t, clk)
			tc.set(f, true)
			id := workloadIDs(1)[0]
			f.setEntries("r1", id)
			h, _ := startHolder(t, f, nil)
			eventually(t, "a refused certificate", func() bool {
				return metricValue(t, h.results.WithLabelValues(ResultInvalid)) >= 1
			})
			if h.Store(id) != nil || h.Held() != 0 {
				t.Fatal("an unverified certificate was stored")
			}
			if err := h.Healthy(); err == nil {
				t.Error("healthy after a refused certificate")
			}
			tc.set(f, false)
			// The retry comes after a backoff on the node's clock.
			eventually(t, "a good certificate after the retry", func() bool {
				clk.Step(time.Second)
				return h.Held() == 1
			})
			if err := h.Healthy(); err != nil {
				t.Errorf("unhealthy after recovery: %v", err)
			}
		})
	}
}

// After a restart, with keys only in memory, everything is issued anew in
// batches, on new keys.
func TestHolderRestartReissuesInBatches(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	ids := workloadIDs(600)
	f.setEntries("r1", ids...)
	h1, stop := startHolder(t, f, nil)
	eventually(t, "first run full", func() bool { return h1.Held() == 600 })
	oldKey := h1.Store(ids[0])
	snap, _ := oldKey.Load()
	oldPub := snap.SVID.Certificates[0].PublicKey
	stop()
	if h1.Store(ids[0]) != nil {
		t.Error("a stopped holder still hands out identities")
	}
	if snap, _ := oldKey.Load(); snap.SVID != nil {
		t.Error("a stopped holder's stores still hold certificates and keys")
	}
	h2, _ := startHolder(t, f, nil)
	eventually(t, "second run full", func() bool { return h2.Held() == 600 })
	if b, _, p := f.counts(); b != 4 || p != 1200 {
		t.Fatalf("%d batch calls for %d params over two runs, want 4 for 1200", b, p)
	}
	snap, _ = h2.Store(ids[0]).Load()
	if snap.SVID.Certificates[0].PublicKey.(*ecdsa.PublicKey).Equal(oldPub) {
		t.Error("the restarted holder reused a key")
	}
	if h2.FirstFullIssuance() < 0 {
		t.Error("no first full issuance time")
	}
}

// An identity that leaves the entries is dropped with its key; streams
// watching its store see the certificate withdrawn.
func TestHolderDropsRemovedEntries(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	ids := workloadIDs(2)
	f.setEntries("r1", ids...)
	h, _ := startHolder(t, f, nil)
	eventually(t, "both held", func() bool { return h.Held() == 2 })
	st := h.Store(ids[1])
	_, changed := h.Entries()
	_, stChanged := st.Load()
	f.setEntries("r2", ids[0])
	idle(t, clk)
	clk.Step(DefaultSyncInterval)
	eventually(t, "removal", func() bool { return h.Held() == 1 })
	<-changed
	<-stChanged
	if h.Store(ids[1]) != nil {
		t.Error("removed identity still held")
	}
	if snap, _ := st.Load(); snap.SVID != nil {
		t.Error("removed identity's store still has its certificate and key")
	}
	entries, _ := h.Entries()
	if len(entries) != 1 || entries[0].ID != ids[0] {
		t.Errorf("entries = %v", entries)
	}
	// Later renewal rounds never ask for it.
	asked := f.askedFor(ids[1])
	idle(t, clk)
	clk.Step(time.Hour)
	eventually(t, "renewal of the remaining one", func() bool { return f.askedFor(ids[0]) >= 2 })
	if f.askedFor(ids[1]) != asked {
		t.Error("a removed identity was renewed")
	}
}

// Concurrent Refresh calls share fetches, and a fetch follows the last
// one by at least the refresh interval.
func TestHolderRefreshCoalesces(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	f.setEntries("r1", workloadIDs(1)...)
	h, _ := startHolder(t, f, nil)
	eventually(t, "first fetch", func() bool { _, n, _ := f.counts(); return n == 1 })
	var (
		wg       sync.WaitGroup
		returned atomic.Int32
	)
	errs := make(chan error, 20)
	for range 20 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs <- h.Refresh(context.Background())
			returned.Add(1)
		}()
	}
	time.Sleep(100 * time.Millisecond)
	if _, n, _ := f.counts(); n != 1 {
		t.Fatalf("%d fetches before the refresh interval passed, want 1", n)
	}
	// The refresh interval passes: one more fetch. The clock is stepped
	// again only if a step landed before the sync loop set its timer.
	for deadline := time.Now().Add(20 * time.Second); ; {
		clk.Step(DefaultRefreshInterval)
		fetched := func() bool { _, n, _ := f.counts(); return n >= 2 }
		for wait := time.Now().Add(time.Second); !fetched() && time.Now().Before(wait); time.Sleep(5 * time.Millisecond) {
		}
		if fetched() {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("no fetch after the refresh interval")
		}
	}
	// The Refresh whose call woke the sync loop asked for that fetch, and
	// returns with it: no further step.
	eventually(t, "a Refresh returning with the fetch it asked for", func() bool { return returned.Load() > 0 })
	// A Refresh that read its target only after that fetch began asks for
	// one more, which waits its refresh interval on the clock: step until
	// every Refresh has returned.
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	for deadline := time.Now().Add(20 * time.Second); ; clk.Step(DefaultRefreshInterval) {
		select {
		case <-done:
		case <-time.After(time.Second):
			if time.Now().After(deadline) {
				t.Fatal("20 concurrent refreshes did not return")
			}
			continue
		}
		break
	}
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	if _, n, _ := f.counts(); n > 3 {
		t.Errorf("%d fetches for 20 concurrent refreshes", n)
	}
}

// A CA that authenticated another node is not believed.
func TestHolderRefusesAnotherNodesEntries(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	f.node = "node-b"
	f.setEntries("r1", workloadIDs(1)...)
	h, _ := startHolder(t, f, nil)
	eventually(t, "an unhealthy holder", func() bool {
		err := h.Healthy()
		return err != nil && strings.Contains(err.Error(), `"node-b"`)
	})
	time.Sleep(50 * time.Millisecond)
	if b, _, _ := f.counts(); b != 0 || h.Held() != 0 {
		t.Error("issued for another node's entries")
	}
}

func metricValue(t *testing.T, c prometheus.Metric) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	if m.Gauge != nil {
		return m.GetGauge().GetValue()
	}
	return m.GetCounter().GetValue()
}

// A holder stopped while a batch call is in flight returns, rather than
// retry the batch in a loop with its canceled context.
func TestHolderStopsDuringIssuance(t *testing.T) {
	clk := clocktesting.NewFakeClock(time.Now())
	f := newFakeCA(t, clk)
	f.hang = true
	f.setEntries("r1", workloadIDs(3)...)
	_, stop := startHolder(t, f, nil)
	eventually(t, "a batch call in flight", func() bool { b, _, _ := f.counts(); return b == 1 })
	before, _, _ := f.counts()
	stop() // fails the test if Run does not return
	if b, _, _ := f.counts(); b > before+1 {
		t.Errorf("%d batch calls after cancel", b-before)
	}
}
