package server_test

import (
	"context"
	"testing"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/ca"
)

func spanAttrs(s sdktrace.ReadOnlySpan) map[attribute.Key]attribute.Value {
	out := map[attribute.Key]attribute.Value{}
	for _, kv := range s.Attributes() {
		out[kv.Key] = kv.Value
	}
	return out
}

// issueTree returns the one ca.Issue span among spans and its children by
// name, failing unless every span is ca.Issue or its direct child, in its
// trace, from the trustmesh/ca tracer.
func issueTree(t *testing.T, spans []sdktrace.ReadOnlySpan) (sdktrace.ReadOnlySpan, map[string]sdktrace.ReadOnlySpan) {
	t.Helper()
	var root sdktrace.ReadOnlySpan
	for _, s := range spans {
		if s.Name() == "ca.Issue" {
			if root != nil {
				t.Fatal("two ca.Issue spans")
			}
			root = s
		}
	}
	if root == nil {
		t.Fatalf("no ca.Issue span among %d", len(spans))
	}
	if root.SpanKind() != trace.SpanKindServer {
		t.Errorf("ca.Issue kind %v, want server", root.SpanKind())
	}
	children := map[string]sdktrace.ReadOnlySpan{}
	for _, s := range spans {
		if s.InstrumentationScope().Name != "trustmesh/ca" {
			t.Errorf("span %s from tracer %q, want trustmesh/ca", s.Name(), s.InstrumentationScope().Name)
		}
		if s == root {
			continue
		}
		if s.Parent().SpanID() != root.SpanContext().SpanID() || s.SpanContext().TraceID() != root.SpanContext().TraceID() {
			t.Errorf("span %s is not a child of ca.Issue", s.Name())
		}
		if _, dup := children[s.Name()]; dup {
			t.Errorf("two %s spans", s.Name())
		}
		children[s.Name()] = s
	}
	return root, children
}

// TestIssueSpanTree checks the trace of one issuance: ca.Issue, child of
// the caller's W3C context in the call's metadata, holding ca.authenticate
// (how the caller authenticated), ca.sign (the identity) and
// ca.journal.commit (the batch that made it durable and the wait for it).
func TestIssueSpanTree(t *testing.T) {
	f := newFixture(t)
	if n := len(f.spans.Ended()); n != 0 {
		t.Fatalf("%d spans before any request: the serving certificate, issued with no traced caller, must make none", n)
	}
	client := pb.NewIstioCertificateServiceClient(f.conn(t, nil))
	key := newKey(t)
	const parent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	ctx := metadata.AppendToOutgoingContext(bearer(f.joinToken(t, alice)), "traceparent", parent)
	resp, err := client.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: makeCSR(t, key, alice)})
	if err != nil {
		t.Fatal(err)
	}
	leaf := parseChain(t, resp.GetCertChain())[0]
	root, kids := issueTree(t, f.spans.Ended())
	if p := root.Parent(); !p.IsRemote() || p.TraceID().String() != "4bf92f3577b34da6a3ce929d0e0e4736" || p.SpanID().String() != "00f067aa0ba902b7" {
		t.Errorf("ca.Issue parent %v, want the caller's span from the metadata", p)
	}
	if got := spanAttrs(root); got["ca.spiffe_id"].AsString() != alice.String() || got["ca.serial"].AsString() != ca.SerialHex(leaf) {
		t.Errorf("ca.Issue attributes %v", root.Attributes())
	}
	for _, name := range []string{"ca.authenticate", "ca.sign", "ca.journal.commit"} {
		if kids[name] == nil {
			t.Fatalf("no %s span under ca.Issue; have %v", name, kids)
		}
	}
	if len(kids) != 3 {
		t.Errorf("ca.Issue has %d children, want 3: %v", len(kids), kids)
	}
	if m := spanAttrs(kids["ca.authenticate"])["ca.authn.method"].AsString(); m != "join-token" {
		t.Errorf("ca.authn.method %q, want join-token", m)
	}
	if id := spanAttrs(kids["ca.sign"])["ca.spiffe_id"].AsString(); id != alice.String() {
		t.Errorf("ca.sign ca.spiffe_id %q, want %s", id, alice)
	}
	commit := spanAttrs(kids["ca.journal.commit"])
	if b, ok := commit["journal.batch_size"]; !ok || b.Type() != attribute.INT64 || b.AsInt64() < 1 {
		t.Errorf("journal.batch_size %v, want an int >= 1", b.Emit())
	}
	if w, ok := commit["journal.wait_ms"]; !ok || w.Type() != attribute.FLOAT64 || w.AsFloat64() < 0 {
		t.Errorf("journal.wait_ms %v, want a float >= 0", w.Emit())
	}
	// In order: authenticated, then signed, then committed.
	if !kids["ca.authenticate"].EndTime().Before(kids["ca.sign"].StartTime()) ||
		kids["ca.journal.commit"].StartTime().Before(kids["ca.sign"].EndTime()) {
		t.Error("ca.authenticate, ca.sign and ca.journal.commit are not in that order")
	}

	// A renewal with the certificate alone, with no caller context: a
	// root span, authenticated by certificate.
	before := len(f.spans.Ended())
	svid := &x509svid.SVID{ID: alice, Certificates: parseChain(t, resp.GetCertChain())[:2], PrivateKey: key}
	renewer := pb.NewIstioCertificateServiceClient(f.conn(t, svid))
	if _, err := renewer.CreateCertificate(context.Background(), &pb.IstioCertificateRequest{Csr: makeCSR(t, key)}); err != nil {
		t.Fatal(err)
	}
	root, kids = issueTree(t, f.spans.Ended()[before:])
	if root.Parent().IsValid() {
		t.Errorf("renewal's ca.Issue has parent %v, want none", root.Parent())
	}
	if m := spanAttrs(kids["ca.authenticate"])["ca.authn.method"].AsString(); m != "certificate" {
		t.Errorf("renewal's ca.authn.method %q, want certificate", m)
	}
}

// TestIssueSpanRefused: a refused request's ca.Issue says why and fails;
// nothing was signed or committed, so there is no such span.
func TestIssueSpanRefused(t *testing.T) {
	f := newFixture(t)
	client := pb.NewIstioCertificateServiceClient(f.conn(t, nil))
	tok := f.joinToken(t, alice)
	if _, err := client.CreateCertificate(bearer(tok), &pb.IstioCertificateRequest{Csr: makeCSR(t, newKey(t), alice)}); err != nil {
		t.Fatal(err)
	}
	before := len(f.spans.Ended())
	if _, err := client.CreateCertificate(bearer(tok), &pb.IstioCertificateRequest{Csr: makeCSR(t, newKey(t), alice)}); err == nil {
		t.Fatal("a spent join token was accepted")
	}
	root, kids := issueTree(t, f.spans.Ended()[before:])
	if root.Status().Code != codes.Error {
		t.Errorf("refused ca.Issue status %v, want Error", root.Status())
	}
	a := spanAttrs(root)
	if a["ca.refusal.reason"].AsString() == "" || a["rpc.grpc.status_code"].AsInt64() == 0 {
		t.Errorf("refused ca.Issue attributes %v, want the reason and the gRPC code", root.Attributes())
	}
	if _, ok := a["ca.spiffe_id"]; ok {
		t.Error("a refused issuance names an identity it did not issue")
	}
	if kids["ca.authenticate"] == nil || kids["ca.authenticate"].Status().Code != codes.Error {
		t.Errorf("ca.authenticate %v, want a failed span", kids["ca.authenticate"])
	}
	if kids["ca.sign"] != nil || kids["ca.journal.commit"] != nil {
		t.Error("a refused authentication has sign or commit spans")
	}
}
