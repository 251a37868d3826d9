package extauthz_test

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"errors"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"
	testclock "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/extauthz"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/internal/connlimit/connlimittest"
)

func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		if err := checkLeaks(); err != nil {
			os.Stderr.WriteString(err.Error() + "\n")
			code = 1
		}
	}
	os.Exit(code)
}

// checkLeaks fails when goroutines of the server or gRPC outlive the tests.
func checkLeaks() error {
	var stacks string
	for range 200 {
		buf := make([]byte, 1<<20)
		stacks = string(buf[:runtime.Stack(buf, true)])
		leaked := false
		for _, g := range strings.Split(stacks, "\n\n") {
			if strings.Contains(g, "authz/extauthz") || strings.Contains(g, "google.golang.org/grpc") {
				if !strings.Contains(g, "TestMain") {
					leaked = true
				}
			}
		}
		if !leaked {
			return nil
		}
		runtime.Gosched()
		time.Sleep(10 * time.Millisecond) // goroutines finish asynchronously after Stop
	}
	return errors.New("leaked goroutines:\n" + stacks)
}

// testPKI is a throwaway CA with a server and a client certificate.
type testPKI struct {
	pool   *x509.CertPool
	server tls.Certificate
	client tls.Certificate
}

func newPKI(t *testing.T) *testPKI {
	t.Helper()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	now := time.Now()
	caTmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign,
	}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leaf := func(serial int64, id string, usage x509.ExtKeyUsage) tls.Certificate {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		u, _ := url.Parse(id)
		tmpl := &x509.Certificate{
			SerialNumber: big.NewInt(serial), NotBefore: now.Add(-time.Hour), NotAfter: now.Add(time.Hour),
			URIs: []*url.URL{u}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
			KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
		}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, ca, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key}
	}
	pool := x509.NewCertPool()
	pool.AddCert(ca)
	return &testPKI{
		pool:   pool,
		server: leaf(2, "spiffe://cluster.local/ns/trustmesh/sa/authz", x509.ExtKeyUsageServerAuth),
		client: leaf(3, "spiffe://cluster.local/ns/foo/sa/envoy", x509.ExtKeyUsageClientAuth),
	}
}

const policies = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/admin"]}}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: istio-system}
spec:
  action: CUSTOM
  provider: {name: "rego:envoy/authz/result"}
  rules: [{}]
`

const bundleRego = `package envoy.authz

import rego.v1

default allow := false

allow if input.attributes.request.http.headers["x-user"] == "alice"

result := {"allowed": true, "headers": {"x-authz-user": "alice"}, "response_headers_to_add": {"x-authz": "ok"}} if allow

result := {"allowed": false, "http_status": 401, "body": "who are you?", "headers": {"www-authenticate": "Basic"}} if not allow
`

func newEngine(t *testing.T) *engine.Engine {
	t.Helper()
	dir := t.TempDir()
	pdir, bdir := filepath.Join(dir, "policies"), filepath.Join(dir, "bundle")
	for _, d := range []string{pdir, bdir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(pdir, "p.yaml"), []byte(policies), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bdir, "authz.rego"), []byte(bundleRego), 0o644); err != nil {
		t.Fatal(err)
	}
	e := engine.New()
	l, err := source.New(source.Config{Engine: e, Policies: &source.Dir{Path: pdir}, Bundles: []source.BundleConfig{{Path: bdir}}})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	return e
}

func checkRequest(path string, headers map[string]string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/bar/sa/client", Address: &corev3.Address{
			Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1"}}}},
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/foo/sa/web", Labels: map[string]string{"app": "web"}},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "GET", Host: "web", Path: path, Headers: headers,
		}},
	}}
}

// serve starts a server on a loopback listener and returns its address and
// a function that stops it and waits.
func serve(t *testing.T, cfg extauthz.Config) (string, func()) {
	t.Helper()
	srv, err := extauthz.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(ctx, lis) }()
	return lis.Addr().String(), func() {
		cancel()
		if err := <-errc; err != nil {
			t.Errorf("Serve: %v", err)
		}
	}
}

func dial(t *testing.T, addr string, creds credentials.TransportCredentials) authv3.AuthorizationClient {
	t.Helper()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return authv3.NewAuthorizationClient(conn)
}

func TestCheckOverMTLS(t *testing.T) {
	pki := newPKI(t)
	var logBuf bytes.Buffer
	clk := testclock.NewFakePassiveClock(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC))
	dl, err := decisionlog.New(decisionlog.Config{Writer: &logBuf, Clock: clk, NewID: func() string { return "id-1" }})
	if err != nil {
		t.Fatal(err)
	}
	logCtx, stopLog := context.WithCancel(context.Background())
	logDone := make(chan error, 1)
	go func() { logDone <- dl.Run(logCtx) }()

	addr, stop := serve(t, extauthz.Config{
		Engine: newEngine(t),
		Log:    dl,
		Creds: credentials.NewTLS(&tls.Config{
			Certificates: []tls.Certificate{pki.server}, ClientCAs: pki.pool,
			ClientAuth: tls.RequireAndVerifyClientCert, MinVersion: tls.VersionTLS13,
		}),
	})
	defer stop()
	client := dial(t, addr, credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{pki.client}, RootCAs: pki.pool, MinVersion: tls.VersionTLS13,
	}))
	ctx := context.Background()

	tests := []struct {
		name       string
		req        *authv3.CheckRequest
		code       codes.Code
		httpStatus int
		header     string // a header the response carries, "key: value"
		body       string
	}{
		{"allowed by the provider", checkRequest("/x?secret=s3cret", map[string]string{"x-user": "alice", "authorization": "Bearer t"}), codes.OK, 0, "x-authz-user: alice", ""},
		{"denied by the provider", checkRequest("/x", nil), codes.PermissionDenied, 401, "www-authenticate: Basic", "who are you?"},
		{"denied by a DENY policy", checkRequest("/admin", map[string]string{"x-user": "alice"}), codes.PermissionDenied, 403, "", ""},
		{"denied path", checkRequest("/a%2fadmin", map[string]string{"x-user": "alice"}), codes.PermissionDenied, 403, "", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			resp, err := client.Check(ctx, tt.req)
			if err != nil {
				t.Fatal(err)
			}
			if got := codes.Code(resp.GetStatus().GetCode()); got != tt.code {
				t.Fatalf("code = %v, want %v (%s)", got, tt.code, resp.GetStatus().GetMessage())
			}
			var hs []*corev3.HeaderValueOption
			if tt.code == codes.OK {
				hs = resp.GetOkResponse().GetHeaders()
				if got := resp.GetOkResponse().GetResponseHeadersToAdd(); len(got) != 1 || got[0].GetHeader().GetKey() != "x-authz" {
					t.Errorf("response headers to add = %v", got)
				}
			} else {
				dr := resp.GetDeniedResponse()
				if int(dr.GetStatus().GetCode()) != tt.httpStatus {
					t.Errorf("http status = %v, want %d", dr.GetStatus().GetCode(), tt.httpStatus)
				}
				if dr.GetBody() != tt.body {
					t.Errorf("body = %q, want %q", dr.GetBody(), tt.body)
				}
				hs = dr.GetHeaders()
			}
			if tt.header != "" {
				found := false
				for _, h := range hs {
					if h.GetHeader().GetKey()+": "+h.GetHeader().GetValue() == tt.header {
						found = true
					}
				}
				if !found {
					t.Errorf("headers %v lack %q", hs, tt.header)
				}
			}
		})
	}

	t.Run("client without a certificate is refused", func(t *testing.T) {
		c := dial(t, addr, credentials.NewTLS(&tls.Config{RootCAs: pki.pool, MinVersion: tls.VersionTLS13}))
		_, err := c.Check(ctx, checkRequest("/", nil))
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("Check without a client certificate: %v, want Unavailable", err)
		}
	})

	stopLog()
	if err := <-logDone; err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(logBuf.String()), "\n")
	if len(lines) != len(tests) {
		t.Fatalf("decision log has %d lines, want %d:\n%s", len(lines), len(tests), logBuf.String())
	}
	var first map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &first); err != nil {
		t.Fatal(err)
	}
	if first["decision_id"] != "id-1" || first["time"] != "2026-01-02T03:04:05Z" || first["allowed"] != true ||
		first["path"] != "/x?secret="+decisionlog.Redacted {
		t.Errorf("first log line = %s", lines[0])
	}
	if h := first["headers"].(map[string]any); h["authorization"] != decisionlog.Redacted || h["x-user"] != decisionlog.Redacted {
		t.Errorf("headers not redacted: %v", h)
	}
	if strings.Contains(logBuf.String(), "s3cret") || strings.Contains(logBuf.String(), "Bearer") {
		t.Errorf("decision log leaks a secret:\n%s", logBuf.String())
	}
	var deny map[string]any
	_ = json.Unmarshal([]byte(lines[2]), &deny)
	if deny["policy"] != "foo/deny-admin" || deny["rule"] != float64(0) || deny["allowed"] != false {
		t.Errorf("deny log line = %s", lines[2])
	}
}

// failing is a Checker whose evaluation always fails.
type failing struct{}

func (failing) CheckInto(_ context.Context, _ *authv3.CheckRequest, d *engine.Decision) error {
	*d = engine.Decision{HTTPStatus: 403, Reason: engine.ReasonEvaluationError}
	return errors.New("boom")
}

func TestEngineErrors(t *testing.T) {
	tests := []struct {
		name     string
		checker  extauthz.Checker
		failOpen bool
		want     codes.Code
	}{
		{"no policy set denies", engine.New(), false, codes.PermissionDenied},
		{"evaluation error denies", failing{}, false, codes.PermissionDenied},
		{"fail open only when asked", failing{}, true, codes.OK},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sock := filepath.Join(t.TempDir(), "authz.sock")
			srv, err := extauthz.New(extauthz.Config{Engine: tt.checker, Address: "unix://" + sock, FailOpen: tt.failOpen})
			if err != nil {
				t.Fatal(err)
			}
			lis, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			errc := make(chan error, 1)
			go func() { errc <- srv.Serve(ctx, lis) }()
			defer func() { cancel(); <-errc }()
			conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			resp, err := authv3.NewAuthorizationClient(conn).Check(context.Background(), checkRequest("/", nil))
			if err != nil {
				t.Fatal(err)
			}
			if got := codes.Code(resp.GetStatus().GetCode()); got != tt.want {
				t.Fatalf("code = %v, want %v", got, tt.want)
			}
			if tt.want != codes.OK && resp.GetDeniedResponse().GetStatus().GetCode() != 403 {
				t.Fatalf("http status = %v, want 403", resp.GetDeniedResponse().GetStatus().GetCode())
			}
		})
	}
}

func TestPlaintextRefused(t *testing.T) {
	tests := []struct {
		name string
		cfg  extauthz.Config
		ok   bool
	}{
		{"tcp without creds", extauthz.Config{Engine: engine.New(), Address: "127.0.0.1:0"}, false},
		{"default address without creds", extauthz.Config{Engine: engine.New()}, false},
		{"tcp with explicit insecure flag", extauthz.Config{Engine: engine.New(), Address: "127.0.0.1:0", InsecurePlaintext: true}, true},
		{"unix socket", extauthz.Config{Engine: engine.New(), Address: "unix:///tmp/x.sock"}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := extauthz.New(tt.cfg)
			if (err == nil) != tt.ok || (!tt.ok && !errors.Is(err, extauthz.ErrPlaintext)) {
				t.Fatalf("New = %v, want ok %v", err, tt.ok)
			}
		})
	}
}

func TestRunFailsWhenItCannotListen(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	srv, err := extauthz.New(extauthz.Config{Engine: engine.New(), Address: lis.Addr().String(), InsecurePlaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Run(context.Background()); err == nil {
		t.Fatal("Run on a busy address returned nil")
	}
}

// TestServeBoundsConnections: ext_authz closes connections that never
// finish their setup or carry no RPC, and serves no more than its cap.
func TestServeBoundsConnections(t *testing.T) {
	t.Run("idle", func(t *testing.T) {
		addr, stop := serve(t, extauthz.Config{Engine: engine.New(), InsecurePlaintext: true,
			Connections: connlimit.Config{IdleTimeout: 300 * time.Millisecond, HandshakeTimeout: 300 * time.Millisecond}})
		defer stop()
		connlimittest.ClosesIdle(t, addr, connlimittest.GRPC(nil), 5*time.Second)
		connlimittest.ClosesIdle(t, addr, connlimittest.Silent, 5*time.Second)
	})
	t.Run("cap", func(t *testing.T) {
		addr, stop := serve(t, extauthz.Config{Engine: engine.New(), InsecurePlaintext: true, Connections: connlimit.Config{MaxConnections: 8}})
		defer stop()
		connlimittest.CapHolds(t, addr, 8, connlimittest.GRPC(nil))
	})
}

func TestBadConnectionLimitsRefused(t *testing.T) {
	if _, err := extauthz.New(extauthz.Config{Engine: engine.New(), InsecurePlaintext: true, Connections: connlimit.Config{MaxConnections: -1}}); err == nil {
		t.Fatal("New accepted a negative connection cap")
	}
}

// TestDeniedResponseCarriesNoUpstreamHeaders: the headers an allowing
// CUSTOM provider returns are for the upstream; when a DENY policy then
// denies the request, the client is sent none of them (in Envoy, ext_authz
// OK headers only ever reach the upstream).
func TestDeniedResponseCarriesNoUpstreamHeaders(t *testing.T) {
	s, err := extauthz.New(extauthz.Config{Engine: newEngine(t), InsecurePlaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	resp, err := s.Check(context.Background(), checkRequest("/admin", map[string]string{":path": "/admin", "x-user": "alice"}))
	if err != nil {
		t.Fatal(err)
	}
	d := resp.GetDeniedResponse()
	if d == nil {
		t.Fatalf("want a denied response, got %v", resp)
	}
	if len(d.GetHeaders()) != 0 {
		t.Fatalf("denied by a DENY policy, yet the client is sent the provider's upstream headers: %v", resp)
	}
}
