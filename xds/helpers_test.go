package xds_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/test/leakcheck"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// TestMain fails a passing run that leaves goroutines of trustmesh's own
// code (the xDS server, its streams). grpc-go leaves
// running the pemfile watchers its xDS bootstraps start (one per
// bootstrap, seen in these tests after every client and server closed),
// so library goroutines are not counted.
func TestMain(m *testing.M) {
	if os.Getenv(benchEnvClients) != "" {
		os.Exit(runBenchClients())
	}
	code := m.Run()
	if code == 0 {
		code = leakcheck.CheckOurs(os.Stderr)
	}
	os.Exit(code)
}

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// settable is a mesh source and policy feed the test changes.
type settable struct {
	mu       sync.Mutex
	mesh     *mesh.Mesh
	policies []*policy.Policy
	version  uint64 // of policies
	changed  []func()
}

func (s *settable) Mesh() (*mesh.Mesh, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mesh, nil
}

func (s *settable) Policies() (uint64, []*policy.Policy) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.version, s.policies
}

func (s *settable) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	s.mu.Lock()
	s.changed = append(s.changed, changed)
	s.mu.Unlock()
	c := make(chan error, 1)
	go func() { <-ctx.Done(); c <- nil }()
	return c, nil
}

func (s *settable) set(m *mesh.Mesh, ps []*policy.Policy) {
	s.mu.Lock()
	if m != nil {
		s.mesh = m
	}
	if ps != nil {
		s.policies = ps
		s.version++
	}
	cbs := append([]func(){}, s.changed...)
	s.mu.Unlock()
	for _, c := range cbs {
		c()
	}
}

// env is an xDS server on loopback with a test CA for its bundle. The xDS
// server has its own fake clock, which drives the debounce. The same
// server run by the control plane, with the real CA, is tested end to end
// in test/e2e.
type env struct {
	t      testing.TB
	ca     *testCA
	xclock *clocktesting.FakeClock
	srv    *xds.Server
	src    *settable
	addr   string
	dir    string
	// reg holds the server's metrics.
	reg *prometheus.Registry
	// spans records the server's spans: it serves with tracing on.
	spans *tracetest.SpanRecorder
}

func start(t testing.TB, m *mesh.Mesh, ps []*policy.Policy) *env {
	t.Helper()
	if m == nil {
		m = &mesh.Mesh{}
	}
	src := &settable{mesh: m, policies: ps}
	return startSources(t, src, src)
}

// startWith runs the server on a mesh source, without policies.
func startWith(t testing.TB, m mesh.Source) *env {
	t.Helper()
	return startSources(t, m, &settable{})
}

// streamInterceptor, when a test sets it, is installed on the servers
// startSources starts (a test that sets it must not run in parallel).
var streamInterceptor grpc.StreamServerInterceptor

func startSources(t testing.TB, meshSrc mesh.Source, polSrc *settable) *env {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	e := &env{t: t, ca: newTestCA(t), xclock: clocktesting.NewFakeClock(time.Now().Truncate(time.Second)), src: polSrc, dir: t.TempDir(),
		reg: prometheus.NewRegistry(), spans: tracetest.NewSpanRecorder()}

	// The xDS server's own serving certificate, as the CA port has.
	serving := e.ca.issue(t, spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh"),
		[]string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)})
	// As ca/server: client certificates are requested, not verified.
	opts := []grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{serving.tlsCert()}, ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS12,
	}))}
	if os.Getenv("TRUSTMESH_XDS_BENCH_SERVER_OPTIONS") == "connlimit" {
		// The benchmarks measure serve's connection options (the CA and xDS port's) when asked.
		opts = append(opts, connlimit.Config{}.GRPCTLSOptions()...)
	}
	if streamInterceptor != nil {
		opts = append(opts, grpc.StreamInterceptor(streamInterceptor))
	}
	gs := grpc.NewServer(opts...)
	var err error
	e.srv, err = xds.New(xds.Config{
		Bundle: e.ca, Mesh: meshSrc, Policies: polSrc,
		Proxy: testProxy(),
		Clock: e.xclock,
		// The benchmarks' throttle of new versions (zero: the default).
		InitialPushes: benchInitialPushes(),
		Log:           testLog(),
		Registerer:    e.reg,
		// Traced, so that every test also runs with tracing on.
		TracerProvider: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(e.spans)),
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	e.srv.Register(gs)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	e.addr = lis.Addr().String()
	runDone := make(chan error, 1)
	go func() { runDone <- e.srv.Run(ctx) }()
	go func() { _ = gs.Serve(lis) }()
	t.Cleanup(func() {
		cancel()
		if err := <-runDone; err != nil {
			t.Errorf("xds Run() = %v", err)
		}
		gs.Stop()
	})
	select {
	case <-e.srv.Ready():
	case <-time.After(10 * time.Second):
		t.Fatal("xds server not ready")
	}
	return e
}

// push changes the sources and drives the debounce to a push.
func (e *env) push(m *mesh.Mesh, ps []*policy.Policy) {
	e.t.Helper()
	before := e.srv.Pushes()
	e.src.set(m, ps)
	e.stepUntilPush(before)
}

// stepUntilPush advances the server's clock by the debounce period until a
// push after the before'th happens. A change that arrives after a step
// restarts the debounce, so one step may not be enough.
func (e *env) stepUntilPush(before uint64) {
	e.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for e.srv.Pushes() == before {
		if time.Now().After(deadline) {
			e.t.Fatal("no push after the debounce")
		}
		if e.xclock.HasWaiters() {
			e.xclock.Step(xds.DefaultDebounce)
		}
		time.Sleep(time.Millisecond)
	}
}

func newKey(t testing.TB) crypto.Signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// workloadCert is a certificate for a SPIFFE ID, its key, and the roots it
// chains to.
type workloadCert struct {
	key   crypto.Signer
	chain []*x509.Certificate // leaf, intermediates
	roots []*x509.Certificate
}

// mint is a workload certificate from the test CA for a SPIFFE ID.
func (e *env) mint(id spiffeid.ID) *workloadCert {
	e.t.Helper()
	return e.ca.issue(e.t, id, nil, nil)
}

// testCA is a root and an intermediate of td, the shape of the real CA's
// chains, which mints the xDS server's and the workloads' certificates. It
// is the xDS server's trust bundle.
type testCA struct {
	root, inter *x509.Certificate
	interKey    crypto.Signer
}

func newTestCA(t testing.TB) *testCA {
	t.Helper()
	now := time.Now()
	rootKey, interKey := newKey(t), newKey(t)
	caTmpl := func(cn string) *x509.Certificate {
		return &x509.Certificate{SerialNumber: randSerial(t), Subject: pkix.Name{Organization: []string{"trustmesh test"}, CommonName: cn},
			URIs: []*url.URL{td.ID().URL()}, NotBefore: now.Add(-time.Hour), NotAfter: now.Add(48 * time.Hour),
			IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign | x509.KeyUsageCRLSign}
	}
	rootT := caTmpl("root")
	der, err := x509.CreateCertificate(rand.Reader, rootT, rootT, rootKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	root, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	der, err = x509.CreateCertificate(rand.Reader, caTmpl("intermediate"), root, interKey.Public(), rootKey)
	if err != nil {
		t.Fatal(err)
	}
	inter, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &testCA{root: root, inter: inter, interKey: interKey}
}

// issue is a certificate for id, with dns and ips for a server, valid for
// the test's hour and then some.
func (c *testCA) issue(t testing.TB, id spiffeid.ID, dns []string, ips []net.IP) *workloadCert {
	t.Helper()
	key := newKey(t)
	now := time.Now()
	tmpl := &x509.Certificate{SerialNumber: randSerial(t), URIs: []*url.URL{id.URL()}, DNSNames: dns, IPAddresses: ips,
		NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, c.inter, key.Public(), c.interKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &workloadCert{key: key, chain: []*x509.Certificate{leaf, c.inter}, roots: []*x509.Certificate{c.root}}
}

// GetX509BundleForTrustDomain makes testCA the xDS server's bundle source.
func (c *testCA) GetX509BundleForTrustDomain(d spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	if d != td {
		return nil, fmt.Errorf("no bundle for %s", d)
	}
	return x509bundle.FromX509Authorities(td, []*x509.Certificate{c.root}), nil
}

func randSerial(t testing.TB) *big.Int {
	n, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 127))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// foreignCert is a certificate from a CA of another trust domain.
func foreignCert(t testing.TB, id string) *workloadCert {
	t.Helper()
	caKey := newKey(t)
	u, _ := url.Parse("spiffe://other.example")
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "other"}, URIs: []*url.URL{u},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true, BasicConstraintsValid: true,
		KeyUsage: x509.KeyUsageCertSign}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, caKey.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(der)
	key := newKey(t)
	lu, _ := url.Parse(id)
	leafT := &x509.Certificate{SerialNumber: big.NewInt(2), URIs: []*url.URL{lu}, NotBefore: time.Now().Add(-time.Hour),
		NotAfter: time.Now().Add(time.Hour), KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth, x509.ExtKeyUsageServerAuth}}
	der, err = x509.CreateCertificate(rand.Reader, leafT, caCert, key.Public(), caKey)
	if err != nil {
		t.Fatal(err)
	}
	leaf, _ := x509.ParseCertificate(der)
	return &workloadCert{key: key, chain: []*x509.Certificate{leaf}, roots: []*x509.Certificate{caCert}}
}

func (w *workloadCert) tlsCert() tls.Certificate {
	c := tls.Certificate{PrivateKey: w.key, Leaf: w.chain[0]}
	for _, x := range w.chain {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// writeDir writes the agent's --cert-dir files: cert-chain.pem, key.pem,
// root-cert.pem.
func (w *workloadCert) writeDir(t testing.TB, dir string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	var chain, roots []byte
	for _, c := range w.chain {
		chain = append(chain, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	for _, c := range w.roots {
		roots = append(roots, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	der, err := x509.MarshalPKCS8PrivateKey(w.key)
	if err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string][]byte{
		"cert-chain.pem": chain, "root-cert.pem": roots,
		"key.pem": pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}),
	} {
		if err := os.WriteFile(filepath.Join(dir, name), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// dialADS connects to the xDS server as a raw ADS client, presenting cert
// (or nothing) and trusting the CA's roots.
func (e *env) dialADS(cert *workloadCert) discoveryv3.AggregatedDiscoveryServiceClient {
	e.t.Helper()
	roots := x509.NewCertPool()
	roots.AddCert(e.ca.root)
	cfg := &tls.Config{RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12}
	if cert != nil {
		cfg.Certificates = []tls.Certificate{cert.tlsCert()}
	}
	conn, err := grpc.NewClient(e.addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return discoveryv3.NewAggregatedDiscoveryServiceClient(conn)
}

// bootstrap is a grpc-go xDS bootstrap for a proxyless workload whose
// agent writes certDir.
func (e *env) bootstrap(node *corev3.Node, certDir string) []byte {
	e.t.Helper()
	md := node.GetMetadata().AsMap()
	files := map[string]any{
		"certificate_file":    filepath.Join(certDir, "cert-chain.pem"),
		"private_key_file":    filepath.Join(certDir, "key.pem"),
		"ca_certificate_file": filepath.Join(certDir, "root-cert.pem"),
	}
	provider := map[string]any{"refresh_interval": "0.1s"}
	for k, v := range files {
		provider[k] = v
	}
	b, err := json.Marshal(map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri":      e.addr,
			"channel_creds":   []any{map[string]any{"type": "tls", "config": files}},
			"server_features": []any{"xds_v3"},
		}},
		"node": map[string]any{"id": node.GetId(), "metadata": md},
		"certificate_providers": map[string]any{
			proxyconfig.ProxylessCertProvider: map[string]any{"plugin_name": "file_watcher", "config": provider},
		},
		"server_listener_resource_name_template": proxyconfig.ProxylessInboundPrefix + "%s",
	})
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// testLog discards the xDS server's log unless TRUSTMESH_TEST_LOG is set.
func testLog() *slog.Logger {
	if os.Getenv("TRUSTMESH_TEST_LOG") != "" {
		return slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	}
	return slog.New(slog.DiscardHandler)
}

func testProxy() proxyconfig.Config {
	return proxyconfig.Config{
		TrustDomain: td, AuthzHost: "127.0.0.1", AuthzPort: 9191,
		AuthzID: spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh"),
	}
}

// fakeBundle has no bundle: for tests that never authenticate.
type fakeBundle struct{}

func (fakeBundle) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	return nil, fmt.Errorf("no bundle for %s", td)
}

func parsePolicies(t *testing.T, yaml string) []*policy.Policy {
	t.Helper()
	ps, err := policy.ParseYAML("test", []byte(yaml), "default")
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

// gauge is the value of one of the server's gauges, or -1 when it has none.
func (e *env) gauge(name string) float64 {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && len(mf.GetMetric()) == 1 {
			return mf.GetMetric()[0].GetGauge().GetValue()
		}
	}
	return -1
}
