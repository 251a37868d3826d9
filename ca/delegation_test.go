package ca_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// fakeNodes is a mesh model: node name to the identities it runs.
type fakeNodes struct {
	mu      sync.Mutex
	holds   map[string][]spiffeid.ID
	asked   []string // "node id" per MayHold call
	mayHold func(ctx context.Context, node string, id spiffeid.ID) error
}

func (f *fakeNodes) Entries(_ context.Context, node string) ([]ca.NodeEntry, string, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	var out []ca.NodeEntry
	for _, id := range f.holds[node] {
		out = append(out, ca.NodeEntry{ID: id, Selectors: []string{"unix:uid:1001"}})
	}
	return out, fmt.Sprint(len(out)), nil
}

func (f *fakeNodes) MayHold(ctx context.Context, node string, id spiffeid.ID) error {
	f.mu.Lock()
	f.asked = append(f.asked, node+" "+id.String())
	hook := f.mayHold
	f.mu.Unlock()
	if hook != nil {
		return hook(ctx, node, id)
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, h := range f.holds[node] {
		if h == id {
			return nil
		}
	}
	return fmt.Errorf("no pod of %s on %s", id, node)
}

var (
	nodeA  = ca.Node{Name: "node-a", ID: spiffeid.RequireFromPath(td, "/node/node-a"), Method: "node-x509", Subject: "x509:abc"}
	nodeID = spiffeid.RequireFromPath(td, "/node/node-b")
	cpID   = spiffeid.RequireFromPath(td, "/ns/trustmesh-system/sa/trustmesh")
)

// delegatingCA is the fixture's CA with a mesh model to authorize against.
func (f *fixture) delegatingCA(t *testing.T, nodes ca.NodeAuthorizer) *ca.CA {
	t.Helper()
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: f.store, Clock: f.clock, Nodes: nodes,
		Reserved: []spiffeid.ID{cpID}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func derCSR(t *testing.T, o csrOpts) []byte {
	t.Helper()
	b, _ := pem.Decode(makeCSR(t, o))
	return b.Bytes
}

// TestIssueDelegatedAuthorizesEachParam: in one batch, what the node runs is
// issued, verified and journalled as the node's; everything else is refused
// on its own, for its own reason, and nothing refused is journalled.
func TestIssueDelegatedAuthorizesEachParam(t *testing.T) {
	f := newFixture(t)
	nodes := &fakeNodes{holds: map[string][]spiffeid.ID{"node-a": {alice}, "node-b": {bob}}}
	c := f.delegatingCA(t, nodes)
	ctx := context.Background()
	corrupt := derCSR(t, csrOpts{})
	corrupt[len(corrupt)-1] ^= 0xff
	reqs := []ca.DelegatedRequest{
		{ID: alice, CSR: derCSR(t, csrOpts{}), TTL: 2 * time.Hour},
		{ID: bob, CSR: derCSR(t, csrOpts{})}, // runs on node-b only
		{ID: nodeID, CSR: derCSR(t, csrOpts{})},
		{ID: cpID, CSR: derCSR(t, csrOpts{})},
		{ID: spiffeid.RequireFromString("spiffe://other.org/ns/default/sa/alice"), CSR: derCSR(t, csrOpts{})},
		{ID: alice, CSR: corrupt},
		{ID: alice, CSR: derCSR(t, csrOpts{uris: []string{bob.String()}})},
		{ID: alice, CSR: makeCSR(t, csrOpts{})}, // PEM, not DER
		{ID: alice, CSR: derCSR(t, csrOpts{uris: []string{alice.String()}})},
	}
	want := []string{"", ca.ReasonNotOnNode, ca.ReasonNodeIdentity, ca.ReasonReserved, ca.ReasonTrustDomain,
		ca.ReasonCSRSignature, ca.ReasonCSRIdentity, ca.ReasonCSRMalformed, ""}
	wantKind := map[string]ca.RefusalKind{ca.ReasonNotOnNode: ca.KindDenied, ca.ReasonNodeIdentity: ca.KindDenied}
	res := c.IssueDelegated(ctx, nodeA, reqs)
	if len(res) != len(reqs) {
		t.Fatalf("%d results for %d requests", len(res), len(reqs))
	}
	for i, r := range res {
		if want[i] != "" {
			rf, ok := ca.AsRefusal(r.Err)
			if !ok || r.Issued != nil {
				t.Fatalf("request %d (%s): %v, %v; want refusal %q", i, reqs[i].ID, r.Issued, r.Err, want[i])
			}
			if rf.Reason != want[i] {
				t.Fatalf("request %d (%s): refused %q (%v), want %q", i, reqs[i].ID, rf.Reason, rf.Err, want[i])
			}
			if k, ok := wantKind[rf.Reason]; ok && rf.Kind != k {
				t.Fatalf("request %d: kind %s, want %s", i, rf.Kind, k)
			}
			continue
		}
		if r.Err != nil {
			t.Fatalf("request %d (%s) refused: %v", i, reqs[i].ID, r.Err)
		}
		leaf := r.Issued.Leaf
		id, _, err := x509svid.Verify(append([]*x509.Certificate{leaf}, r.Issued.Chain...), f.auth, x509svid.WithTime(f.clock.Now()))
		if err != nil || id != alice {
			t.Fatalf("request %d: issued certificate verifies as %s, %v; want %s", i, id, err, alice)
		}
		iss, err := f.store.LookupIssuance(ctx, ca.SerialHex(leaf))
		if err != nil {
			t.Fatalf("request %d: not journalled: %v", i, err)
		}
		if iss.Node != "node-a" || iss.Origin != journal.OriginNode || iss.Method != ca.MethodNodeDelegated ||
			iss.Caller != nodeA.Subject || iss.SPIFFEID != alice.String() {
			t.Fatalf("request %d journalled as %+v; want node node-a, origin node, method node-delegated, caller %s", i, iss, nodeA.Subject)
		}
	}
	if got := res[0].Issued.Leaf.NotAfter.Sub(f.clock.Now()); got != 2*time.Hour {
		t.Fatalf("asked for 2h, got a certificate valid for %s more", got)
	}
	// The node-identity, reserved and foreign requests are refused before
	// the mesh model is asked.
	for _, a := range nodes.asked {
		if a == "node-a "+nodeID.String() || a == "node-a "+cpID.String() {
			t.Fatalf("the mesh model was asked %q", a)
		}
	}
}

// TestNodeEntriesLeaveOutWhatIsNeverDelegable: the mesh lists every pod on
// a node, the control plane's own among them; the entries a node is sent
// leave out what the CA would refuse it every time (reserved, another
// node's identity, another trust domain), each for the reason
// IssueDelegated refuses it, and keep the node's own node identity only
// for a node that may be delegated it (review15-cor F1).
func TestNodeEntriesLeaveOutWhatIsNeverDelegable(t *testing.T) {
	f := newFixture(t)
	ownA := spiffeid.RequireFromPath(td, "/node/node-a")
	foreign := spiffeid.RequireFromString("spiffe://other.org/ns/default/sa/alice")
	nodes := &fakeNodes{holds: map[string][]spiffeid.ID{"node-a": {alice, cpID, nodeID, foreign, ownA}}}
	c := f.delegatingCA(t, nodes)
	kubeA := ca.Node{Name: "node-a", ID: spiffeid.RequireFromPath(td, "/ns/trustmesh-system/sa/trustmesh-node"),
		Method: ca.MethodNodeKubernetes, Subject: "system:serviceaccount:trustmesh-system:trustmesh-node"}
	for _, tc := range []struct {
		node ca.Node
		want []spiffeid.ID
	}{
		{nodeA, []spiffeid.ID{alice}},       // authenticated by its node SVID: it has its own
		{kubeA, []spiffeid.ID{alice, ownA}}, // by its token: its own node SVID is delegated
	} {
		entries, rev, err := c.NodeEntries(context.Background(), tc.node)
		if err != nil {
			t.Fatalf("%s: NodeEntries: %v", tc.node.Method, err)
		}
		var got []spiffeid.ID
		for _, e := range entries {
			got = append(got, e.ID)
		}
		if fmt.Sprint(got) != fmt.Sprint(tc.want) {
			t.Errorf("%s: entries %v, want %v", tc.node.Method, got, tc.want)
		}
		if rev != "5" {
			t.Errorf("%s: revision %q, want the model's", tc.node.Method, rev)
		}
		// Every identity left out is one IssueDelegated refuses, for the
		// reason Delegable gives.
		for _, id := range nodes.holds["node-a"] {
			kept := false
			for _, w := range got {
				kept = kept || w == id
			}
			if kept {
				continue
			}
			why, ok := ca.AsRefusal(c.Delegable(tc.node, id))
			if !ok {
				t.Fatalf("%s: %s left out, but Delegable allows it", tc.node.Method, id)
			}
			res := c.IssueDelegated(context.Background(), tc.node, []ca.DelegatedRequest{{ID: id, CSR: derCSR(t, csrOpts{})}})
			if r, ok := ca.AsRefusal(res[0].Err); !ok || r.Reason != why.Reason {
				t.Errorf("%s: %s left out for %q, but IssueDelegated answers %v", tc.node.Method, id, why.Reason, res[0].Err)
			}
		}
	}
}

// TestIssueDelegatedOffWithoutMeshModel: a CA with no NodeAuthorizer
// delegates nothing.
func TestIssueDelegatedOffWithoutMeshModel(t *testing.T) {
	f := newFixture(t)
	res := f.ca.IssueDelegated(context.Background(), nodeA, []ca.DelegatedRequest{{ID: alice, CSR: derCSR(t, csrOpts{})}})
	if r, ok := ca.AsRefusal(res[0].Err); !ok || r.Reason != ca.ReasonDelegationOff || r.Kind != ca.KindDenied {
		t.Fatalf("IssueDelegated without Nodes = %v, %v; want refusal %q", res[0].Issued, res[0].Err, ca.ReasonDelegationOff)
	}
	if _, _, err := f.ca.NodeEntries(context.Background(), nodeA); err == nil {
		t.Fatal("NodeEntries without Nodes listed entries")
	}
}

// TestIssueDelegatedNoNodeName: a zero Node (nothing authenticated) gets
// nothing, whatever the mesh model says.
func TestIssueDelegatedNoNodeName(t *testing.T) {
	f := newFixture(t)
	c := f.delegatingCA(t, &fakeNodes{holds: map[string][]spiffeid.ID{"": {alice}}})
	res := c.IssueDelegated(context.Background(), ca.Node{}, []ca.DelegatedRequest{{ID: alice, CSR: derCSR(t, csrOpts{})}})
	if r, ok := ca.AsRefusal(res[0].Err); !ok || r.Reason != ca.ReasonNodeNotTrusted {
		t.Fatalf("IssueDelegated for no node = %v, %v; want refusal %q", res[0].Issued, res[0].Err, ca.ReasonNodeNotTrusted)
	}
}

// TestIssueDelegatedMayHoldErrors: a refusal from the mesh model is kept as
// it is; a cancelled wait is unavailable, not a verdict.
func TestIssueDelegatedMayHoldErrors(t *testing.T) {
	f := newFixture(t)
	busy := ca.Refuse(ca.KindUnavailable, ca.ReasonNodeCheckFailed, errors.New("mesh model not synced"))
	nodes := &fakeNodes{mayHold: func(context.Context, string, spiffeid.ID) error { return busy }}
	c := f.delegatingCA(t, nodes)
	res := c.IssueDelegated(context.Background(), nodeA, []ca.DelegatedRequest{{ID: alice, CSR: derCSR(t, csrOpts{})}})
	if r, ok := ca.AsRefusal(res[0].Err); !ok || r != busy {
		t.Fatalf("got %v, want the authorizer's own refusal", res[0].Err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	nodes.mayHold = func(ctx context.Context, _ string, _ spiffeid.ID) error { return ctx.Err() }
	res = c.IssueDelegated(ctx, nodeA, []ca.DelegatedRequest{{ID: alice, CSR: derCSR(t, csrOpts{})}})
	if r, ok := ca.AsRefusal(res[0].Err); !ok || r.Kind != ca.KindUnavailable {
		t.Fatalf("cancelled MayHold gave %v, want an unavailable refusal", res[0].Err)
	}
}

// TestIssueDelegatedRunsParamsConcurrently: the params of a batch are
// authorized and issued at the same time (so their records share journal
// commits), bounded by DelegationConcurrency.
func TestIssueDelegatedRunsParamsConcurrently(t *testing.T) {
	f := newFixture(t)
	const n = 3 * ca.DelegationConcurrency
	var mu sync.Mutex
	inside, peak := 0, 0
	all := make(chan struct{})
	nodes := &fakeNodes{mayHold: func(ctx context.Context, _ string, _ spiffeid.ID) error {
		mu.Lock()
		inside++
		if inside > peak {
			peak = inside
		}
		if inside == ca.DelegationConcurrency {
			close(all)
		}
		mu.Unlock()
		defer func() { mu.Lock(); inside--; mu.Unlock() }()
		select {
		case <-all: // every slot was taken at once
			return nil
		case <-time.After(5 * time.Second):
			return errors.New("params are not authorized concurrently")
		}
	}}
	c := f.delegatingCA(t, nodes)
	reqs := make([]ca.DelegatedRequest, n)
	for i := range reqs {
		reqs[i] = ca.DelegatedRequest{ID: spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/default/sa/w%d", i)), CSR: derCSR(t, csrOpts{})}
	}
	serials := map[string]bool{}
	for i, r := range c.IssueDelegated(context.Background(), nodeA, reqs) {
		if r.Err != nil {
			t.Fatalf("param %d: %v", i, r.Err)
		}
		if id, err := x509svid.IDFromCert(r.Issued.Leaf); err != nil || id != reqs[i].ID {
			t.Fatalf("result %d is for %s, want %s (results out of order)", i, id, reqs[i].ID)
		}
		serials[ca.SerialHex(r.Issued.Leaf)] = true
	}
	if len(serials) != n {
		t.Fatalf("%d distinct certificates for %d params", len(serials), n)
	}
	if peak > ca.DelegationConcurrency {
		t.Fatalf("%d params at once, more than the bound %d", peak, ca.DelegationConcurrency)
	}
}

// TestIssueDelegatedBoundedAcrossBatches (review15-sec F4): however many
// batches run at once, at most DelegatedLimit params are in flight in the
// CA, each of which may poll the mesh model.
func TestIssueDelegatedBoundedAcrossBatches(t *testing.T) {
	f := newFixture(t)
	var mu sync.Mutex
	inside, peak := 0, 0
	release := make(chan struct{})
	nodes := &fakeNodes{mayHold: func(ctx context.Context, _ string, id spiffeid.ID) error {
		mu.Lock()
		inside++
		peak = max(peak, inside)
		mu.Unlock()
		defer func() { mu.Lock(); inside--; mu.Unlock() }()
		<-release
		return fmt.Errorf("no pod of %s", id)
	}}
	c := f.delegatingCA(t, nodes)
	const batches = 4 // of DelegationConcurrency params each: 128 at once without a CA-wide bound
	var wg sync.WaitGroup
	for b := range batches {
		reqs := make([]ca.DelegatedRequest, ca.DelegationConcurrency)
		for i := range reqs {
			reqs[i] = ca.DelegatedRequest{ID: spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/default/sa/b%d-w%d", b, i)), CSR: derCSR(t, csrOpts{})}
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for _, r := range c.IssueDelegated(context.Background(), nodeA, reqs) {
				if r.Err == nil {
					t.Error("a param not on the node was issued")
				}
			}
		}()
	}
	// Let every param that can start do so, then release them.
	deadline := time.Now().Add(5 * time.Second)
	for {
		mu.Lock()
		n := inside
		mu.Unlock()
		if n >= ca.DelegatedLimit || time.Now().After(deadline) {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond)
	close(release)
	wg.Wait()
	if peak != ca.DelegatedLimit {
		t.Fatalf("%d params in flight at the peak over %d batches; want the CA-wide bound %d", peak, batches, ca.DelegatedLimit)
	}
}

// TestIssueDelegatedWaitsOncePerBatch (review15-sec F4): the params of a
// batch share one wait window for a mesh model catching up (WaitDeadline),
// so a batch of params that are not on the node waits about once, not once
// per wave of DelegationConcurrency params.
func TestIssueDelegatedWaitsOncePerBatch(t *testing.T) {
	f := newFixture(t)
	const wait = 300 * time.Millisecond
	var (
		mu        sync.Mutex
		deadlines = map[time.Time]int{}
	)
	nodes := &fakeNodes{mayHold: func(ctx context.Context, _ string, id spiffeid.ID) error {
		d := ca.WaitDeadline(ctx, time.Now(), wait)
		mu.Lock()
		deadlines[d]++
		mu.Unlock()
		time.Sleep(time.Until(d))
		return fmt.Errorf("no pod of %s after waiting", id)
	}}
	c := f.delegatingCA(t, nodes)
	reqs := make([]ca.DelegatedRequest, 4*ca.DelegationConcurrency)
	for i := range reqs {
		reqs[i] = ca.DelegatedRequest{ID: spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/default/sa/w%d", i)), CSR: derCSR(t, csrOpts{})}
	}
	for i, r := range c.IssueDelegated(context.Background(), nodeA, reqs) {
		if r.Err == nil {
			t.Fatalf("param %d was issued", i)
		}
	}
	// Every param, in every wave of DelegationConcurrency, waited until
	// the one deadline the first set: the batch waited once. (A bound
	// on the batch's wall-clock time said the same, less surely, on
	// loaded cores.)
	if len(deadlines) != 1 {
		t.Fatalf("the %d params of one batch waited until %d different deadlines; want one", len(reqs), len(deadlines))
	}
	for _, n := range deadlines {
		if n != len(reqs) {
			t.Fatalf("%d of %d params asked for the wait window", n, len(reqs))
		}
	}
	// Outside a batch, each wait is its own.
	now := time.Now()
	if d := ca.WaitDeadline(context.Background(), now, wait); !d.Equal(now.Add(wait)) {
		t.Fatalf("WaitDeadline outside a batch = %s, want now+%s", d, wait)
	}
}

// BenchmarkIssueDelegatedBatch is one full batch (cav1.MaxBatch params) on
// the SQLite journal: what a node agent's restart costs per 500 identities.
func BenchmarkIssueDelegatedBatch(b *testing.B) {
	f := newFixture(b)
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: f.store, Clock: f.clock, Nodes: &fakeNodes{
		mayHold: func(context.Context, string, spiffeid.ID) error { return nil }}})
	if err != nil {
		b.Fatal(err)
	}
	const n = 500
	reqs := make([]ca.DelegatedRequest, n)
	for i := range reqs {
		b, _ := pem.Decode(makeCSR(b, csrOpts{}))
		reqs[i] = ca.DelegatedRequest{ID: spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/default/sa/w%d", i)), CSR: b.Bytes}
	}
	b.ResetTimer()
	for range b.N {
		for _, r := range c.IssueDelegated(context.Background(), nodeA, reqs) {
			if r.Err != nil {
				b.Fatal(r.Err)
			}
		}
	}
	b.ReportMetric(float64(b.Elapsed().Microseconds())/float64(b.N*n), "µs/cert")
}
