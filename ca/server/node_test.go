package server_test

import (
	"context"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"net"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/server"
)

var nodeA = spiffeid.RequireFromPath(td, "/node/node-a")

// meshNodes is a mesh model: node name to the identities of the workloads
// on it.
type meshNodes struct {
	mu    sync.Mutex
	holds map[string][]spiffeid.ID
}

func (m *meshNodes) Entries(_ context.Context, node string) ([]ca.NodeEntry, string, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	var out []ca.NodeEntry
	for i, id := range m.holds[node] {
		out = append(out, ca.NodeEntry{ID: id, Selectors: []string{fmt.Sprintf("%s%d", cav1.SelectorUID, 1000+i)}})
	}
	return out, fmt.Sprintf("rev-%d", len(out)), nil
}

func (m *meshNodes) MayHold(_ context.Context, node string, id spiffeid.ID) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	for _, h := range m.holds[node] {
		if h == id {
			return nil
		}
	}
	return fmt.Errorf("no workload of %s on %s", id, node)
}

// nodeFixture is the CA serving the node service as the control plane
// does: on its TLS port, which asks for a client certificate but does not
// require one, beside the node's join-token enrolment.
type nodeFixture struct {
	*fixture
	addr string
}

func newNodeFixture(t *testing.T) *nodeFixture {
	t.Helper()
	f := newFixture(t) // the CA, its journal, join tokens and serving certificate
	dc, err := ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: f.store, Clock: f.clock, Reserved: []spiffeid.ID{cpID},
		Nodes: &meshNodes{holds: map[string][]spiffeid.ID{"node-a": {alice}, "node-b": {bob}}}})
	if err != nil {
		t.Fatal(err)
	}
	f.reg = prometheus.NewRegistry()
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(f.serving.TLSConfig())))
	cav1.RegisterNodeServiceServer(srv, server.NewNodeService(server.NodeServiceConfig{
		CA: dc,
		Authenticator: &authn.NodeAuthenticator{TrustDomain: td,
			Renewal: &authn.Renewal{TrustDomain: td, Bundle: f.auth, Store: f.store, MaxEnrolmentAge: time.Hour, Clock: f.clock}},
		Refusals: f.refusals, Metrics: server.NewMetrics(f.reg, f.auth.Current), Clock: f.clock, Log: quiet,
		TracerProvider: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(f.spans)),
	}))
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(lis) }()
	t.Cleanup(func() { srv.Stop(); <-served })
	nf := &nodeFixture{fixture: f}
	nf.addr = lis.Addr().String()
	return nf
}

// enrol gets an SVID for id with a join token over the certificate
// service, as `trustmesh node` does off Kubernetes.
func (f *nodeFixture) enrol(t *testing.T, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key := newKey(t)
	resp, err := pb.NewIstioCertificateServiceClient(f.conn(t, nil)).CreateCertificate(bearer(f.joinToken(t, id)),
		&pb.IstioCertificateRequest{Csr: makeCSR(t, key)})
	if err != nil {
		t.Fatal(err)
	}
	chain := parseChain(t, resp.GetCertChain())
	return &x509svid.SVID{ID: id, Certificates: chain[:len(chain)-1], PrivateKey: key}
}

// client dials the node service as a node agent does: it verifies that
// the server is the control plane, and presents svid when it is set.
func (f *nodeFixture) client(t *testing.T, svid *x509svid.SVID) cav1.NodeServiceClient {
	t.Helper()
	tlsCfg := tlsconfig.TLSClientConfig(f.auth, tlsconfig.AuthorizeID(cpID))
	if svid != nil {
		tlsCfg = tlsconfig.MTLSClientConfig(svid, f.auth, tlsconfig.AuthorizeID(cpID))
	}
	cc, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cav1.NewNodeServiceClient(cc)
}

func derCSR(t *testing.T) []byte {
	t.Helper()
	b, _ := pem.Decode([]byte(makeCSR(t, newKey(t))))
	return b.Bytes
}

func errorReason(err error) string {
	for _, d := range status.Convert(err).Details() {
		if ei, ok := d.(*errdetails.ErrorInfo); ok && ei.GetDomain() == cav1.ErrorDomain {
			return ei.GetReason()
		}
	}
	return ""
}

// TestNodeServiceServesANode: a node SVID lists its node's entries and gets
// a certificate for each identity on the node; a param for one elsewhere
// is refused on its own, recorded and counted, while the rest are issued.
func TestNodeServiceServesANode(t *testing.T) {
	f := newNodeFixture(t)
	ctx := context.Background()
	svid := f.enrol(t, nodeA)
	c := f.client(t, svid)

	entries, err := c.FetchEntries(ctx, &cav1.FetchEntriesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if entries.GetNode() != "node-a" || entries.GetRevision() != "rev-1" || len(entries.GetEntries()) != 1 ||
		entries.GetEntries()[0].GetSpiffeId() != alice.String() || entries.GetEntries()[0].GetSelectors()[0] != "unix:uid:1000" {
		t.Fatalf("FetchEntries = %v", entries)
	}

	resp, err := c.BatchNewX509SVID(ctx, &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{
		{SpiffeId: alice.String(), Csr: derCSR(t), TtlSeconds: 600},
		{SpiffeId: bob.String(), Csr: derCSR(t)},
		{SpiffeId: "not a spiffe id", Csr: derCSR(t)},
		{SpiffeId: alice.String(), Csr: []byte("not a CSR")},
		{SpiffeId: nodeA.String(), Csr: derCSR(t)},
		{SpiffeId: alice.String(), Csr: derCSR(t)},
	}})
	if err != nil {
		t.Fatal(err)
	}
	want := []struct {
		code   codes.Code
		reason string
	}{
		{codes.OK, ""},
		{codes.PermissionDenied, cav1.NotOnNode},
		{codes.InvalidArgument, ca.ReasonIDMalformed},
		{codes.InvalidArgument, ca.ReasonCSRMalformed},
		{codes.PermissionDenied, ca.ReasonNodeIdentity},
		{codes.OK, ""},
	}
	if len(resp.GetResults()) != len(want) {
		t.Fatalf("%d results, want %d", len(resp.GetResults()), len(want))
	}
	var serials []string
	for i, r := range resp.GetResults() {
		if codes.Code(r.GetCode()) != want[i].code || r.GetReason() != want[i].reason {
			t.Fatalf("result %d: code %s reason %q (%s); want %s %q", i, codes.Code(r.GetCode()), r.GetReason(), r.GetMessage(), want[i].code, want[i].reason)
		}
		if want[i].code != codes.OK {
			if len(r.GetCertChain()) != 0 {
				t.Fatalf("refused result %d carries a chain", i)
			}
			continue
		}
		var chain []*x509.Certificate
		for _, der := range r.GetCertChain() {
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				t.Fatal(err)
			}
			chain = append(chain, cert)
		}
		id, _, err := x509svid.Verify(chain, f.auth, x509svid.WithTime(f.clock.Now()))
		if err != nil || id != alice {
			t.Fatalf("result %d verifies as %s, %v; want %s", i, id, err, alice)
		}
		if chain[len(chain)-1].IsCA && chain[len(chain)-1].CheckSignatureFrom(chain[len(chain)-1]) == nil {
			t.Fatalf("result %d carries the root", i)
		}
		serials = append(serials, ca.SerialHex(chain[0]))
		if i == 0 {
			if life := chain[0].NotAfter.Sub(f.clock.Now()); life != 10*time.Minute {
				t.Fatalf("asked for 600 s, got %s", life)
			}
		}
	}
	for _, s := range serials {
		iss, err := f.store.LookupIssuance(ctx, s)
		if err != nil || iss.Node != "node-a" || iss.Origin != journal.OriginNode || iss.Method != ca.MethodNodeDelegated ||
			iss.Caller != "x509:"+ca.SerialHex(svid.Certificates[0]) {
			t.Fatalf("journalled %+v, %v; want node node-a, origin node, caller the node SVID", iss, err)
		}
	}
	var refusedNotOnNode bool
	for _, row := range f.journalRows(t) {
		if row.Kind == string(journal.KindRefusal) && row.Reason == ca.ReasonNotOnNode && row.Method == ca.MethodNodeDelegated &&
			row.SPIFFEID == bob.String() && row.Caller == "x509:"+ca.SerialHex(svid.Certificates[0]) {
			refusedNotOnNode = true
		}
	}
	if !refusedNotOnNode {
		t.Fatal("the refusal of bob's param is not in the journal")
	}
	for result, n := range map[string]float64{"issued": 2, ca.ReasonNotOnNode: 1, ca.ReasonIDMalformed: 1} {
		if got, _ := metricValue(t, f.reg, "trustmesh_ca_delegated_total", map[string]string{"result": result}); got != n {
			t.Errorf("trustmesh_ca_delegated_total{result=%q} = %v, want %v", result, got, n)
		}
	}
	if got, _ := metricValue(t, f.reg, "trustmesh_ca_node_batch_size", nil); got != 1 {
		t.Errorf("trustmesh_ca_node_batch_size count = %v, want 1", got)
	}
}

// TestNodeServiceRefusesNonNodes: only a node SVID is a node. A workload's
// SVID, a certificate of no trustmesh root and a call with no credentials
// are refused as a whole, before anything is issued.
func TestNodeServiceRefusesNonNodes(t *testing.T) {
	f := newNodeFixture(t)
	ctx := context.Background()
	batch := &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{{SpiffeId: alice.String(), Csr: derCSR(t)}}}
	for _, tc := range []struct {
		name   string
		svid   *x509svid.SVID
		code   codes.Code
		reason string
	}{
		{"a workload's SVID", f.enrol(t, alice), codes.PermissionDenied, cav1.NodeNotTrusted},
		{"a self-signed node certificate", selfSignedSVID(t, nodeA), codes.Unauthenticated, ""},
		{"no credentials", nil, codes.Unauthenticated, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := f.client(t, tc.svid)
			_, err := c.FetchEntries(ctx, &cav1.FetchEntriesRequest{})
			if status.Code(err) != tc.code || errorReason(err) != tc.reason {
				t.Fatalf("FetchEntries: %v (reason %q); want %s %q", err, errorReason(err), tc.code, tc.reason)
			}
			resp, err := c.BatchNewX509SVID(ctx, batch)
			if status.Code(err) != tc.code || errorReason(err) != tc.reason || resp != nil {
				t.Fatalf("BatchNewX509SVID: %v, %v (reason %q); want %s %q", resp, err, errorReason(err), tc.code, tc.reason)
			}
		})
	}
	for _, row := range f.journalRows(t) {
		if row.Kind == string(journal.KindIssuance) && row.Method == ca.MethodNodeDelegated {
			t.Fatalf("issued %+v to a caller that is not a node", row)
		}
	}
	if got, _ := metricValue(t, f.reg, "trustmesh_ca_node_refused_total",
		map[string]string{"rpc": "BatchNewX509SVID", "reason": ca.ReasonNodeNotTrusted, "code": "PermissionDenied"}); got != 1 {
		t.Errorf("trustmesh_ca_node_refused_total for the workload's batch = %v, want 1", got)
	}
}

// TestNodeServiceBatchLimit: more than MaxBatch params is refused as a
// whole; exactly MaxBatch is served.
func TestNodeServiceBatchLimit(t *testing.T) {
	f := newNodeFixture(t)
	c := f.client(t, f.enrol(t, nodeA))
	csr := derCSR(t)
	params := make([]*cav1.NewX509SVIDParams, cav1.MaxBatch+1)
	for i := range params {
		params[i] = &cav1.NewX509SVIDParams{SpiffeId: bob.String(), Csr: csr} // not on node-a: nothing is signed
	}
	_, err := c.BatchNewX509SVID(context.Background(), &cav1.BatchNewX509SVIDRequest{Params: params})
	if status.Code(err) != codes.InvalidArgument {
		t.Fatalf("a batch of %d: %v; want InvalidArgument", len(params), err)
	}
	resp, err := c.BatchNewX509SVID(context.Background(), &cav1.BatchNewX509SVIDRequest{Params: params[:cav1.MaxBatch]})
	if err != nil || len(resp.GetResults()) != cav1.MaxBatch {
		t.Fatalf("a batch of %d: %d results, %v", cav1.MaxBatch, len(resp.GetResults()), err)
	}
}

// TestNodeServiceTracesBatch: a batch is one ca.IssueDelegated span, naming
// the node and its size, with a ca.sign span per issued param inside it.
func TestNodeServiceTracesBatch(t *testing.T) {
	f := newNodeFixture(t)
	c := f.client(t, f.enrol(t, nodeA))
	if _, err := c.BatchNewX509SVID(context.Background(), &cav1.BatchNewX509SVIDRequest{Params: []*cav1.NewX509SVIDParams{
		{SpiffeId: alice.String(), Csr: derCSR(t)}, {SpiffeId: alice.String(), Csr: derCSR(t)}, {SpiffeId: bob.String(), Csr: derCSR(t)},
	}}); err != nil {
		t.Fatal(err)
	}
	var batch sdktrace.ReadOnlySpan
	for _, sp := range f.spans.Ended() {
		if sp.Name() == server.SpanIssueDelegated {
			batch = sp
		}
	}
	if batch == nil {
		t.Fatal("no ca.IssueDelegated span")
	}
	attrs := map[string]string{}
	for _, kv := range batch.Attributes() {
		attrs[string(kv.Key)] = kv.Value.Emit()
	}
	if attrs[server.AttrNode] != "node-a" || attrs[server.AttrBatchSize] != "3" || attrs[server.AttrBatchIssued] != "2" {
		t.Fatalf("ca.IssueDelegated attributes %v; want node node-a, size 3, issued 2", attrs)
	}
	signs := 0
	for _, sp := range f.spans.Ended() {
		if sp.Name() == ca.SpanSign && sp.Parent().SpanID() == batch.SpanContext().SpanID() {
			signs++
		}
	}
	if signs != 2 {
		t.Fatalf("%d ca.sign spans under the batch, want 2", signs)
	}
}
