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
	"io"
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
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/test/leakcheck"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// TestMain fails a passing run that leaves goroutines of trustmesh's own
// code (the xDS server, its streams, the control plane). grpc-go leaves
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

// settable is a mesh and policy source the test changes.
type settable struct {
	mu       sync.Mutex
	mesh     *mesh.Mesh
	policies []*policy.Policy
	changed  []func()
}

func (s *settable) Mesh() (*mesh.Mesh, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.mesh, nil
}

func (s *settable) Policies() ([]*policy.Policy, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.policies, nil
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
	}
	cbs := append([]func(){}, s.changed...)
	s.mu.Unlock()
	for _, c := range cbs {
		c()
	}
}

// env is a real control plane (the CA) and an xDS server on loopback. The
// xDS server has its own fake clock, which drives the debounce.
type env struct {
	t      testing.TB
	cp     *controlplane.ControlPlane
	clock  *clocktesting.FakeClock
	xclock *clocktesting.FakeClock
	srv    *xds.Server
	src    *settable
	addr   string
	dir    string
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

func startSources(t testing.TB, meshSrc mesh.Source, polSrc *settable) *env {
	t.Helper()
	clk := clocktesting.NewFakeClock(time.Now().Truncate(time.Second))
	ctx, cancel := context.WithCancel(context.Background())
	cp, err := controlplane.New(ctx, controlplane.Config{
		DataDir: t.TempDir(), ListenCA: "127.0.0.1:0", ListenMonitoring: "127.0.0.1:0",
		Kubernetes: controlplane.KubernetesOff, Clock: clk,
		Log: slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	cpDone := make(chan error, 1)
	go func() { cpDone <- cp.Run(ctx) }()
	e := &env{t: t, cp: cp, clock: clk, xclock: clocktesting.NewFakeClock(clk.Now()), src: polSrc, dir: t.TempDir()}

	// The xDS server's own serving certificate, as the CA port has.
	key := newKey(t)
	issued, err := cp.CA.IssueServing(ctx, ca.ServingRequest{
		ID:       spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh"),
		DNSNames: []string{"localhost"}, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, PublicKey: key.Public(), TTL: time.Hour,
	})
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{PrivateKey: key, Leaf: issued.Leaf, Certificate: [][]byte{issued.Leaf.Raw}}
	for _, c := range issued.Chain {
		cert.Certificate = append(cert.Certificate, c.Raw)
	}
	// As ca/server: client certificates are requested, not verified.
	gs := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequestClientCert, MinVersion: tls.VersionTLS12,
	})))
	e.srv, err = xds.New(xds.Config{
		Bundle: cp.Authority, Mesh: meshSrc, Policies: polSrc,
		Proxy: testProxy(),
		Clock: e.xclock,
		Log:   testLog(),
	})
	if err != nil {
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
		if err := <-cpDone; err != nil {
			t.Errorf("control plane Run() = %v", err)
		}
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

// workloadCert is a certificate from the real CA for a SPIFFE ID.
type workloadCert struct {
	key   crypto.Signer
	chain []*x509.Certificate // leaf, intermediates
	roots []*x509.Certificate
}

func (e *env) mint(id spiffeid.ID) *workloadCert {
	e.t.Helper()
	key := newKey(e.t)
	issued, err := e.cp.CA.IssueServing(context.Background(), ca.ServingRequest{ID: id, PublicKey: key.Public(), TTL: time.Hour})
	if err != nil {
		e.t.Fatal(err)
	}
	return &workloadCert{key: key, chain: append([]*x509.Certificate{issued.Leaf}, issued.Chain...), roots: e.cp.Authority.Current().Roots}
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
	for _, r := range e.cp.Authority.Current().Roots {
		roots.AddCert(r)
	}
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
