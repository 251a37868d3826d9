package tracing

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"os"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/internal/tracing"
)

const (
	td         = "spiffe://cluster.local"
	webID      = td + "/ns/shop/sa/web"
	frontendID = td + "/ns/front/sa/frontend"
	// secret is sent where a careless span would copy it: a header value,
	// the path's query and a bearer token.
	secret = "s3cr3t-value-9f1c"
)

var policies = map[string]string{
	"shop.yaml": `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-frontend, namespace: shop}
spec:
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/front/sa/frontend"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: shop}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin*"]}}]
`,
}

// Span kinds in OTLP.
const (
	kindInternal = 1
	kindServer   = 2
)

// traceContext is a W3C trace context made up by the test, as a caller
// (Envoy, an agent) would send it.
type traceContext struct{ traceID, spanID string }

func newTraceContext(t *testing.T) traceContext {
	t.Helper()
	b := make([]byte, 24)
	if _, err := rand.Read(b); err != nil {
		t.Fatal(err)
	}
	return traceContext{traceID: hex.EncodeToString(b[:16]), spanID: hex.EncodeToString(b[16:])}
}

// header is the traceparent header, sampled.
func (tc traceContext) header() string { return "00-" + tc.traceID + "-" + tc.spanID + "-01" }

// TestSpanTrees runs `trustmesh serve` exporting to a real collector, over
// each OTLP protocol, and asserts the span trees of one issuance and of
// ext_authz Checks.
func TestSpanTrees(t *testing.T) {
	needCollector(t)
	for _, protocol := range []string{"http/protobuf", "grpc"} {
		t.Run(strings.ReplaceAll(protocol, "/", "-"), func(t *testing.T) {
			c := startCollector(t)
			endpoint := c.http
			if protocol == "grpc" {
				endpoint = c.grpc
			}
			// The proxies' tracer exports to the same collector.
			s := startServe(t, policies, mesh, []string{"--tracing-collector", c.grpc, "--tracing-sampling", "5"}, []string{
				"OTEL_TRACES_EXPORTER=otlp",
				"OTEL_EXPORTER_OTLP_PROTOCOL=" + protocol,
				"OTEL_EXPORTER_OTLP_ENDPOINT=http://" + endpoint,
				"OTEL_BSP_SCHEDULE_DELAY=100"})
			roots := x509.NewCertPool()
			if !roots.AppendCertsFromPEM([]byte(cli(t, "ca", "bundle", "--data-dir", s.dataDir))) {
				t.Fatal("ca bundle printed no certificates")
			}

			// One issuance: a workload enrols with a join token, its
			// agent's context in the call's metadata.
			issue := newTraceContext(t)
			web := enrol(t, s, roots, webID, issue)
			checkIssuance(t, c, issue)

			// Checks, as the web workload's Envoy sends them.
			client := authzClient(t, s, roots, web)
			fromMetadata, inHeader := newTraceContext(t), newTraceContext(t)
			allow := check(t, client, frontendID, "/orders", fromMetadata, inHeader)
			if allow != codes.OK {
				t.Fatalf("Check from the frontend = %s, want OK", allow)
			}
			headerOnly := newTraceContext(t)
			deny := check(t, client, frontendID, "/admin/users?token="+secret, traceContext{}, headerOnly)
			if deny != codes.PermissionDenied {
				t.Fatalf("Check of /admin = %s, want PermissionDenied", deny)
			}
			noPolicy := newTraceContext(t)
			if got := check(t, client, td+"/ns/other/sa/stranger", "/", noPolicy, traceContext{}); got != codes.PermissionDenied {
				t.Fatalf("Check from a stranger = %s, want PermissionDenied", got)
			}
			checkDecisions(t, c, fromMetadata, inHeader, headerOnly, noPolicy)

			// The web workload's Envoy asks for its configuration: an
			// xds.push span, and connection managers with a tracer that
			// exports to --tracing-collector.
			listeners := fetchListeners(t, s, roots, web, webNode)
			checkProxyTracer(t, listeners, c.grpc, 5)
			checkPush(t, c, webNode)
		})
	}
}

// checkIssuance asserts the span tree of one CSR: ca.Issue is a server
// span whose parent is the caller's, and ca.authenticate, ca.sign and
// ca.journal.commit are its children, with their attributes.
func checkIssuance(t *testing.T, c *otelcol, caller traceContext) {
	t.Helper()
	want := []string{"ca.Issue", "ca.authenticate", "ca.sign", "ca.journal.commit"}
	spans := inTrace(waitSpans(t, c, "the issuance's spans", func(all []span) bool {
		tr := inTrace(all, caller.traceID)
		for _, n := range want {
			if len(named(tr, n)) == 0 {
				return false
			}
		}
		return true
	}), caller.traceID)
	issue := only(t, spans, "ca.Issue")
	if issue.ParentSpanID != caller.spanID {
		t.Fatalf("ca.Issue's parent is %q, want the caller's span %s", issue.ParentSpanID, caller.spanID)
	}
	if issue.Kind != kindServer || issue.Scope != "trustmesh/ca" || issue.Service != "trustmesh" {
		t.Fatalf("ca.Issue: kind %d, tracer %q, service %q; want a server span of trustmesh/ca in service trustmesh", issue.Kind, issue.Scope, issue.Service)
	}
	wantAttr(t, issue, "ca.spiffe_id", webID)
	for _, n := range want[1:] {
		child := only(t, spans, n)
		if child.ParentSpanID != issue.SpanID {
			t.Fatalf("%s's parent is %q, want ca.Issue (%s)", n, child.ParentSpanID, issue.SpanID)
		}
		if child.Scope != "trustmesh/ca" {
			t.Fatalf("%s comes from tracer %q, want trustmesh/ca", n, child.Scope)
		}
	}
	wantAttr(t, only(t, spans, "ca.authenticate"), "ca.authn.method", "join-token")
	wantAttr(t, only(t, spans, "ca.sign"), "ca.spiffe_id", webID)
	commit := only(t, spans, "ca.journal.commit")
	if n, ok := commit.Attrs["journal.batch_size"].(int64); !ok || n < 1 {
		t.Fatalf("ca.journal.commit: journal.batch_size = %v (%T), want an integer of at least 1", commit.Attrs["journal.batch_size"], commit.Attrs["journal.batch_size"])
	}
	if w, ok := commit.Attrs["journal.wait_ms"].(float64); !ok || w < 0 {
		t.Fatalf("ca.journal.commit: journal.wait_ms = %v (%T), want a non-negative float", commit.Attrs["journal.wait_ms"], commit.Attrs["journal.wait_ms"])
	}
	for _, s := range spans {
		if s.Name != "ca.Issue" && !strings.HasPrefix(s.Name, "ca.") {
			t.Fatalf("unexpected span %s in the issuance's trace", s.Name)
		}
	}
}

// checkDecisions asserts the ext_authz.Check spans: the parent comes from
// the gRPC metadata first, else from the request's traceparent header; the
// decision, policy, rule and action are attributes; no attribute carries a
// header value, the query or a token.
func checkDecisions(t *testing.T, c *otelcol, fromMetadata, inHeader, headerOnly, noPolicy traceContext) {
	t.Helper()
	all := waitSpans(t, c, "the Checks' spans", func(all []span) bool {
		for _, tc := range []traceContext{fromMetadata, headerOnly, noPolicy} {
			if len(named(inTrace(all, tc.traceID), "ext_authz.Check")) == 0 {
				return false
			}
		}
		return true
	})
	if got := inTrace(all, inHeader.traceID); len(got) != 0 {
		t.Fatalf("the request header's traceparent won over the gRPC metadata's: %+v", got)
	}
	for _, tc := range []struct {
		name    string
		ctx     traceContext
		from    string
		attrs   map[string]any
		noAttrs []string
	}{
		{"allowed, context in the metadata", fromMetadata, "grpc-metadata",
			map[string]any{"authz.decision": "allow", "authz.policy": "shop/allow-frontend", "authz.rule": 0, "authz.action": "ALLOW"}, nil},
		{"denied by a DENY rule, context in a header", headerOnly, "http-header",
			map[string]any{"authz.decision": "deny", "authz.policy": "shop/deny-admin", "authz.rule": 0, "authz.action": "DENY"}, nil},
		{"denied, no ALLOW policy matched", noPolicy, "grpc-metadata",
			map[string]any{"authz.decision": "deny"}, []string{"authz.rule"}},
	} {
		s := only(t, inTrace(all, tc.ctx.traceID), "ext_authz.Check")
		if s.ParentSpanID != tc.ctx.spanID {
			t.Fatalf("%s: ext_authz.Check's parent is %q, want the caller's span %s", tc.name, s.ParentSpanID, tc.ctx.spanID)
		}
		if s.Kind != kindServer || s.Scope != "trustmesh/authz" || s.Service != "trustmesh" {
			t.Fatalf("%s: kind %d, tracer %q, service %q; want a server span of trustmesh/authz in service trustmesh", tc.name, s.Kind, s.Scope, s.Service)
		}
		wantAttr(t, s, "authz.trace_context", tc.from)
		for k, v := range tc.attrs {
			wantAttr(t, s, k, v)
		}
		for _, k := range tc.noAttrs {
			noAttr(t, s, k)
		}
		if r, _ := s.Attrs["authz.reason"].(string); r == "" {
			t.Fatalf("%s: no authz.reason: %v", tc.name, s.Attrs)
		}
	}
	for _, s := range all {
		for k, v := range s.Attrs {
			if strings.Contains(fmt.Sprint(v), secret) {
				t.Fatalf("span %s attribute %s carries a secret from the request: %v", s.Name, k, v)
			}
		}
	}
}

// workload is a key and its certificate chain from the CA.
type workload struct {
	key   *ecdsa.PrivateKey
	chain [][]byte
}

// enrol obtains a certificate for id with a join token, as a workload off
// Kubernetes does, with tc in the call's metadata.
func enrol(t *testing.T, s *serve, roots *x509.CertPool, id string, tc traceContext) *workload {
	t.Helper()
	token := cli(t, "ca", "token", "create", "--data-dir", s.dataDir, "--spiffe-id", id, "--ttl", "10m")
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := grpc.NewClient(s.ca, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: s.caServingName, MinVersion: tls.VersionTLS12})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ctx = metadata.NewOutgoingContext(ctx, metadata.Pairs("authorization", "Bearer "+token, "clusterid", "Kubernetes", "traceparent", tc.header()))
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600})
	if err != nil {
		t.Fatalf("enrolling %s: %v", id, err)
	}
	w := &workload{key: key}
	for _, p := range resp.GetCertChain() {
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			t.Fatalf("chain element is not PEM: %q", p)
		}
		w.chain = append(w.chain, b.Bytes)
	}
	if len(w.chain) == 0 {
		t.Fatal("empty certificate chain")
	}
	return w
}

// authzClient calls the authorization service over mTLS as w, as an Envoy
// does.
func authzClient(t *testing.T, s *serve, roots *x509.CertPool, w *workload) authv3.AuthorizationClient {
	t.Helper()
	conn, err := grpc.NewClient(s.authz, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: roots, ServerName: s.caServingName, MinVersion: tls.VersionTLS12,
		Certificates: []tls.Certificate{{Certificate: w.chain, PrivateKey: w.key}},
	})))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return authv3.NewAuthorizationClient(conn)
}

// check sends one Check of a GET of path on the web workload from src,
// with meta (if set) in the call's gRPC metadata and header (if set) as
// the request's traceparent header, and returns the decision.
func check(t *testing.T, client authv3.AuthorizationClient, src, path string, meta, header traceContext) codes.Code {
	t.Helper()
	addr := func(ip string, port uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
	}
	headers := map[string]string{":authority": "web.shop.svc.cluster.local", ":method": "GET", ":path": path,
		"authorization": "Bearer " + secret, "x-api-key": secret}
	if header.traceID != "" {
		headers["traceparent"] = header.header()
	}
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: src, Address: addr("10.0.7.1", 40000)},
		Destination: &authv3.AttributeContext_Peer{Principal: webID, Address: addr("10.0.1.1", 8080)},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: path, Host: "web.shop.svc.cluster.local", Scheme: "http", Protocol: "HTTP/1.1", Headers: headers,
		}},
	}}
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		if meta.traceID != "" {
			ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", meta.header())
		}
		resp, err := client.Check(ctx, req, grpc.WaitForReady(true))
		cancel()
		if err == nil {
			return codes.Code(resp.GetStatus().GetCode())
		}
		// The authz port opens once the policies are loaded.
		if status.Code(err) != codes.Unavailable || time.Now().After(deadline) {
			t.Fatalf("Check: %v", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestExportToCollector: internal/tracing, set up from the standard
// variables, exports to the real collector over each OTLP protocol, and
// the spans arrive with their names, links and service.name.
func TestExportToCollector(t *testing.T) {
	needCollector(t)
	c := startCollector(t)
	for protocol, endpoint := range map[string]string{"http/protobuf": c.http, "grpc": c.grpc} {
		// The SDK reads the endpoint from the process's environment.
		t.Setenv("OTEL_TRACES_EXPORTER", "otlp")
		t.Setenv("OTEL_EXPORTER_OTLP_PROTOCOL", protocol)
		t.Setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://"+endpoint)
		p, err := tracing.Setup(context.Background(), os.LookupEnv, io.Discard)
		if err != nil {
			t.Fatal(err)
		}
		ctx, parent := p.TracerProvider.Tracer("trustmesh/test").Start(context.Background(), "parent "+protocol)
		_, child := p.TracerProvider.Tracer("trustmesh/test").Start(ctx, "child "+protocol)
		child.End()
		parent.End()
		if err := p.Shutdown(context.Background()); err != nil {
			t.Fatalf("%s: %v", protocol, err)
		}
		spans := waitSpans(t, c, protocol, func(all []span) bool { return len(named(all, "child "+protocol)) > 0 })
		pa, ch := only(t, spans, "parent "+protocol), only(t, spans, "child "+protocol)
		if ch.ParentSpanID != pa.SpanID || ch.TraceID != pa.TraceID || pa.ParentSpanID != "" {
			t.Fatalf("%s: parent %+v, child %+v: not linked", protocol, pa, ch)
		}
		if pa.Service != "trustmesh" || pa.Scope != "trustmesh/test" {
			t.Fatalf("%s: service %q, scope %q", protocol, pa.Service, pa.Scope)
		}
	}
}
