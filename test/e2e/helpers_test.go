package e2e

// The end-to-end harness, shared by every test in the package:
//
//   - startControlPlane runs the control plane in-process on loopback, on a
//     data directory of the test's, with Kubernetes off and its log in the
//     test's log. A function on controlplane.Config sets what a test needs
//     (a fake clock, a mesh and a policy directory, rotation settings). stop
//     takes it down; restart brings it back on the same CA address and data
//     directory.
//   - The test reaches it as an operator and a workload would: joinToken and
//     bundleFile use the CA's operator API (ca/admin) on the data directory;
//     mint gets a certificate over the CA port with a join token
//     (agent/caclient), never from the control plane's internals.
//   - startAgent runs a node agent (agent.Run) against it; watch, fetch and
//     newSDS are a workload's and Envoy's view of the agent's socket.

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"log/slog"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	core "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	tlsv3 "github.com/envoyproxy/go-control-plane/envoy/extensions/transport_sockets/tls/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	secretv3 "github.com/envoyproxy/go-control-plane/envoy/service/secret/v3"
	resourcev3 "github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/agent"
	"github.com/trustmesh/trustmesh/agent/caclient"
	"github.com/trustmesh/trustmesh/agent/sds"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

// TestMain fails a passing run that leaves goroutines of trustmesh's own
// code (the control plane, agents, the xDS server's streams). grpc-go
// leaves running the pemfile watchers its xDS bootstraps start, so library
// goroutines are not counted.
func TestMain(m *testing.M) {
	code := m.Run()
	if code == 0 {
		code = leakcheck.CheckOurs(os.Stderr)
	}
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// tempDir is a short temporary directory: unix socket paths are limited to
// 108 bytes, which t.TempDir's names can exceed.
func tempDir(t testing.TB) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "e2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// controlPlane is trustmesh's control plane run in-process on loopback.
type controlPlane struct {
	t testing.TB
	// cfg is the configuration it runs with; after start, Listen.CA holds
	// the bound address, so that a restart comes back on it.
	cfg    controlplane.Config
	addrs  controlplane.Addrs
	cancel context.CancelFunc
	done   chan error
}

// startControlPlane runs a control plane on dataDir with every listener on
// a loopback port of its own. configure, if not nil, changes the
// configuration before the start. It is stopped when the test ends.
func startControlPlane(t testing.TB, dataDir string, configure func(*controlplane.Config)) *controlPlane {
	t.Helper()
	cfg := controlplane.Config{
		DataDir:    dataDir,
		Listen:     controlplane.ListenConfig{CA: "127.0.0.1:0", Monitoring: "127.0.0.1:0"},
		Kubernetes: controlplane.KubernetesConfig{Mode: controlplane.KubernetesOff},
		Log:        slog.New(slog.NewTextHandler(testWriter{t}, nil)).With("component", "controlplane"),
	}
	if configure != nil {
		configure(&cfg)
	}
	c := &controlPlane{t: t, cfg: cfg}
	c.start()
	t.Cleanup(c.stop)
	return c
}

func (c *controlPlane) start() {
	c.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cp, err := controlplane.New(ctx, c.cfg)
	if err != nil {
		cancel()
		c.t.Fatal(err)
	}
	c.cancel, c.done = cancel, make(chan error, 1)
	go func() { c.done <- cp.Run(ctx) }()
	c.addrs = cp.Addrs()
	c.cfg.Listen.CA = c.addrs.CA.String()
}

// stop cancels the control plane and waits for Run to return; Run must
// return nil. Stopping a stopped control plane does nothing.
func (c *controlPlane) stop() {
	c.t.Helper()
	if c.cancel == nil {
		return
	}
	c.cancel()
	c.cancel = nil
	if err := <-c.done; err != nil {
		c.t.Errorf("control plane Run: %v", err)
	}
}

// restart stops the control plane if it runs and starts it again on the
// same CA address and data directory.
func (c *controlPlane) restart() {
	c.t.Helper()
	c.stop()
	c.start()
}

// addr is the CA port, which also serves xDS and the bundle stream.
func (c *controlPlane) addr() string { return c.cfg.Listen.CA }

func (c *controlPlane) dataDir() admin.DataDir { return admin.DataDir(c.cfg.DataDir) }

// roots are the CA's roots, as `trustmesh ca bundle` reads them.
func (c *controlPlane) roots() []*x509.Certificate {
	c.t.Helper()
	b, err := admin.TrustBundle(context.Background(), c.dataDir(), admin.JournalOptions{}, "")
	if err != nil {
		c.t.Fatal(err)
	}
	return b.X509Authorities()
}

// bundleFile writes the CA's roots as an agent's bootstrap --ca-bundle.
func (c *controlPlane) bundleFile(path string) string {
	c.t.Helper()
	var out []byte
	for _, r := range c.roots() {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	if err := os.WriteFile(path, out, 0o600); err != nil {
		c.t.Fatal(err)
	}
	return path
}

// joinToken makes a join token for id, as `trustmesh ca token` does.
func (c *controlPlane) joinToken(id spiffeid.ID, ttl time.Duration) string {
	c.t.Helper()
	tok, err := admin.CreateJoinToken(context.Background(), c.dataDir(), admin.JournalOptions{}, id.String(), ttl)
	if err != nil {
		c.t.Fatal(err)
	}
	return tok
}

// workloadCert is a certificate for a SPIFFE ID, its key, and the roots
// it chains to.
type workloadCert struct {
	key   crypto.Signer
	chain []*x509.Certificate // leaf, intermediates
	roots []*x509.Certificate
}

// mint gets a certificate for id from the CA over its port, enrolling with
// a fresh join token.
func (c *controlPlane) mint(id spiffeid.ID) *workloadCert {
	c.t.Helper()
	key := newKey(c.t)
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{URIs: []*url.URL{id.URL()}}, key)
	if err != nil {
		c.t.Fatal(err)
	}
	roots := c.roots()
	client, err := caclient.New(caclient.Config{Address: c.addr(), Roots: func() []*x509.Certificate { return roots }, Now: c.now})
	if err != nil {
		c.t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	chain, err := client.IssueWithToken(ctx, c.joinToken(id, time.Minute),
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), time.Hour)
	if err != nil {
		c.t.Fatalf("issue a certificate for %s: %v", id, err)
	}
	return &workloadCert{key: key, chain: chain, roots: roots}
}

// now is the control plane's time.
func (c *controlPlane) now() time.Time {
	if c.cfg.Clock != nil {
		return c.cfg.Clock.Now()
	}
	return time.Now()
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

func newKey(t testing.TB) crypto.Signer {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// agentEnv holds what the agents of a test share: the clock they run on
// (the control plane's, when it has a fake one) and a short directory for
// their sockets and files.
type agentEnv struct {
	t     testing.TB
	clock clock.Clock
	dir   string
}

// runningAgent is an agent started by startAgent.
type runningAgent struct {
	cfg    agent.Config
	cancel context.CancelFunc
	done   chan error
}

// startAgent runs an agent with cfg until the test ends; Run must then
// return nil.
func (e *agentEnv) startAgent(cfg agent.Config) *runningAgent {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &runningAgent{cfg: cfg, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- agent.Run(ctx, cfg) }()
	e.t.Cleanup(func() { r.stop(e.t) })
	return r
}

func (r *runningAgent) stop(t testing.TB) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	if err := <-r.done; err != nil {
		t.Errorf("agent Run after cancel returned %v, want nil", err)
	}
}

// agentConfig is an agent of id enrolling at cp with a fresh join token,
// its socket and CA bundle in e.dir/name.
func (e *agentEnv) agentConfig(cp *controlPlane, name string, id spiffeid.ID, tokenTTL time.Duration) agent.Config {
	e.t.Helper()
	dir := filepath.Join(e.dir, name)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		e.t.Fatal(err)
	}
	return agent.Config{
		CAAddress:    cp.addr(),
		CABundleFile: cp.bundleFile(filepath.Join(dir, "ca.pem")),
		JoinToken:    cp.joinToken(id, tokenTTL),
		SocketPath:   filepath.Join(dir, "agent.sock"),
		CertTTL:      time.Hour,
		Clock:        e.clock,
		Logger:       slog.New(slog.NewTextHandler(testWriter{e.t}, &slog.HandlerOptions{Level: slog.LevelDebug})).With("agent", name),
		Registry:     prometheus.NewRegistry(),
	}
}

// advanceUntil steps the fake clock by step, at most max times, until cond
// holds, giving the agent a moment to act after each step.
func advanceUntil(t testing.TB, fc interface{ Step(time.Duration) }, step time.Duration, max int, what string, cond func() bool) {
	t.Helper()
	for i := 0; ; i++ {
		deadline := time.Now().Add(200 * time.Millisecond)
		for time.Now().Before(deadline) {
			if cond() {
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
		if i == max {
			t.Fatalf("no %s after advancing the clock %d times by %s", what, max, step)
		}
		fc.Step(step)
	}
}

// watch starts an unchanged go-spiffe client watching the agent's socket.
func watch(t testing.TB, socketPath string) <-chan *workloadapi.X509Context {
	t.Helper()
	waitFor(t, func() bool { _, err := os.Stat(socketPath); return err == nil }, "the socket")
	updates := make(chan *workloadapi.X509Context, 100)
	ctx, cancel := context.WithCancel(context.Background())
	c, err := workloadapi.New(ctx, workloadapi.WithAddr("unix://"+socketPath))
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = c.WatchX509Context(ctx, x509Watcher(updates))
	}()
	t.Cleanup(func() {
		cancel()
		<-done
		c.Close()
	})
	return updates
}

type x509Watcher chan *workloadapi.X509Context

func (w x509Watcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w <- c }
func (w x509Watcher) OnX509ContextWatchError(error)                  {}

// nextSVID returns the next update and checks it the way a workload would:
// the SVID verifies, at the agents' time, against the fetched bundle and
// names want.
func (e *agentEnv) nextSVID(updates <-chan *workloadapi.X509Context, want spiffeid.ID) *workloadapi.X509Context {
	t := e.t
	t.Helper()
	select {
	case u := <-updates:
		s := u.DefaultSVID()
		id, _, err := x509svid.Verify(s.Certificates, u.Bundles, x509svid.WithTime(e.clock.Now()))
		if err != nil {
			t.Fatalf("fetched SVID does not verify against the fetched bundle: %v", err)
		}
		if id != want {
			t.Fatalf("fetched SVID for %s, want %s", id, want)
		}
		return u
	case <-time.After(20 * time.Second):
		t.Fatal("no Workload API update")
		return nil
	}
}

// fetch makes a fresh go-spiffe fetch, once the socket exists.
func fetch(t testing.TB, socketPath string) *x509svid.SVID {
	t.Helper()
	waitFor(t, func() bool { _, err := os.Stat(socketPath); return err == nil }, "the socket")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	s, err := workloadapi.FetchX509SVID(ctx, workloadapi.WithAddr("unix://"+socketPath))
	if err != nil {
		t.Fatalf("fetch over %s: %v", socketPath, err)
	}
	return s
}

func serial(s *x509svid.SVID) string { return s.Certificates[0].SerialNumber.String() }

// sdsClient is an Envoy-like SDS stream over the agent's socket.
type sdsClient struct {
	stream secretv3.SecretDiscoveryService_StreamSecretsClient
	names  []string
}

func newSDS(t testing.TB, socketPath string) *sdsClient {
	t.Helper()
	waitFor(t, func() bool { _, err := os.Stat(socketPath); return err == nil }, "the socket")
	conn, err := grpc.NewClient("unix://"+socketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(func() {
		cancel()
		conn.Close()
	})
	stream, err := secretv3.NewSecretDiscoveryServiceClient(conn).StreamSecrets(ctx)
	if err != nil {
		t.Fatal(err)
	}
	c := &sdsClient{stream: stream, names: []string{sds.CertificateName, sds.RootCAName}}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: &core.Node{Id: "sidecar"}, TypeUrl: resourcev3.SecretType, ResourceNames: c.names}); err != nil {
		t.Fatal(err)
	}
	return c
}

// recvUntil receives and ACKs responses until each named secret has come.
func (c *sdsClient) recvUntil(t testing.TB, names ...string) map[string]*tlsv3.Secret {
	t.Helper()
	got := map[string]*tlsv3.Secret{}
	result := make(chan error, 1)
	go func() {
		for {
			resp, err := c.stream.Recv()
			if err != nil {
				result <- err
				return
			}
			for _, r := range resp.GetResources() {
				var s tlsv3.Secret
				if err := r.UnmarshalTo(&s); err != nil {
					result <- err
					return
				}
				got[s.GetName()] = &s
			}
			if err := c.stream.Send(&discoveryv3.DiscoveryRequest{Node: &core.Node{Id: "sidecar"}, TypeUrl: resourcev3.SecretType,
				ResourceNames: c.names, VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
				result <- err
				return
			}
			complete := true
			for _, n := range names {
				complete = complete && got[n] != nil
			}
			if complete {
				result <- nil
				return
			}
		}
	}()
	select {
	case err := <-result:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("SDS did not deliver %v", names)
	}
	return got
}

func checkSDSCert(t testing.TB, secret *tlsv3.Secret, want *x509svid.SVID) {
	t.Helper()
	chain := string(secret.GetTlsCertificate().GetCertificateChain().GetInlineBytes())
	if !strings.HasPrefix(chain, pemOf(want.Certificates[0])) {
		t.Fatalf("SDS default does not start with the certificate serial %s", serial(want))
	}
	if len(secret.GetTlsCertificate().GetPrivateKey().GetInlineBytes()) == 0 {
		t.Fatal("SDS default carries no key")
	}
}

func pemOf(c *x509.Certificate) string {
	s, _, _ := (&x509svid.SVID{Certificates: []*x509.Certificate{c}}).Marshal()
	return string(s)
}

// counter is the value of the counter name{reason=reason} in reg.
func counter(t testing.TB, reg *prometheus.Registry, name, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("metric %s{reason=%q} not found", name, reason)
	return 0
}

func waitFor(t testing.TB, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testWriter sends a log to the test's log.
type testWriter struct{ t testing.TB }

var logMu sync.Mutex

func (w testWriter) Write(p []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
