package agent

import (
	"context"
	"crypto/x509"
	"errors"
	"log/slog"
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
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/certdir"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	"github.com/trustmesh/trustmesh/agent/rotation"
	"github.com/trustmesh/trustmesh/agent/sds"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) {
	os.Exit(leakcheck.Run(m))
}

var (
	td      = spiffeid.RequireTrustDomainFromString("cluster.local")
	ownID   = spiffeid.RequireFromString("spiffe://cluster.local/vm/web-1")
	otherID = spiffeid.RequireFromString("spiffe://cluster.local/vm/db-1")
	start   = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
)

// env is a test CA on loopback and the files an agent needs.
type env struct {
	t      *testing.T
	clock  *clocktesting.FakeClock
	auth   *testca.Authority
	ca     *testca.Server
	bundle string
	dir    string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	fc := clocktesting.NewFakeClock(start)
	auth := testca.New(t, td, start)
	srv, err := testca.NewServer(testca.ServerConfig{
		Authority: auth,
		Now:       fc.Now,
		Tokens:    map[string]spiffeid.ID{"join-token": ownID},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	// Short: unix socket paths are limited to 108 bytes.
	dir, err := os.MkdirTemp("", "agent")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	bundle := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(bundle, auth.RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	return &env{t: t, clock: fc, auth: auth, ca: srv, bundle: bundle, dir: dir}
}

func (e *env) config() Config {
	return Config{
		CAAddress:    e.ca.Addr(),
		CABundleFile: e.bundle,
		JoinToken:    "join-token",
		SocketPath:   filepath.Join(e.dir, "agent.sock"),
		CertTTL:      time.Hour,
		Clock:        e.clock,
		Logger:       slog.New(slog.NewTextHandler(testWriter{e.t}, &slog.HandlerOptions{Level: slog.LevelDebug})),
		Registry:     prometheus.NewRegistry(),
	}
}

// running is an agent started by start.
type running struct {
	cfg    Config
	cancel context.CancelFunc
	done   chan error
}

func (e *env) start(cfg Config) *running {
	e.t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{cfg: cfg, cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- Run(ctx, cfg) }()
	e.t.Cleanup(func() { r.stop(e.t) })
	return r
}

func (r *running) stop(t *testing.T) {
	t.Helper()
	if r.cancel == nil {
		return
	}
	r.cancel()
	r.cancel = nil
	if err := <-r.done; err != nil {
		t.Errorf("Run after cancel returned %v, want nil", err)
	}
}

// settle waits until every part that uses the clock is blocked on it.
func (e *env) settle(waiters int) {
	e.t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for e.clock.Waiters() < waiters {
		if time.Now().After(deadline) {
			e.t.Fatalf("%d parts waiting on the clock, want %d", e.clock.Waiters(), waiters)
		}
		time.Sleep(time.Millisecond)
	}
}

// watch starts an unchanged go-spiffe client watching the agent's socket.
func watch(t *testing.T, socketPath string) <-chan *workloadapi.X509Context {
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
// the SVID verifies against the fetched bundle and names ownID.
func (e *env) nextSVID(updates <-chan *workloadapi.X509Context) *workloadapi.X509Context {
	t := e.t
	t.Helper()
	select {
	case u := <-updates:
		s := u.DefaultSVID()
		id, _, err := x509svid.Verify(s.Certificates, u.Bundles, x509svid.WithTime(e.clock.Now()))
		if err != nil {
			t.Fatalf("fetched SVID does not verify against the fetched bundle: %v", err)
		}
		if id != ownID {
			t.Fatalf("fetched SVID for %s, want %s", id, ownID)
		}
		return u
	case <-time.After(20 * time.Second):
		t.Fatal("no Workload API update")
		return nil
	}
}

// fetch makes a fresh go-spiffe fetch, once the socket exists.
func fetch(t *testing.T, socketPath string) *x509svid.SVID {
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

func serial(s *x509svid.SVID) string { return s.Certificates[0].SerialNumber.Text(16) }

func TestAgentServesAndRotatesOnInjectedClock(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.CertDir = filepath.Join(e.dir, "certs")
	e.start(cfg)

	updates := watch(t, cfg.SocketPath)
	first := e.nextSVID(updates).DefaultSVID()
	if calls := e.ca.Calls(); len(calls) != 1 || calls[0].Token != "join-token" {
		t.Fatalf("first issuance calls %+v, want one with the join token", calls)
	}
	sdsStream := newSDS(t, cfg.SocketPath)
	got := sdsStream.recvUntil(t, sds.CertificateName, sds.RootCAName)
	checkSDSCert(t, got[sds.CertificateName], first)

	// Half-life is 30m, ±3m of jitter. Step past it: the agent renews over
	// mTLS and both the workload and Envoy get the new certificate.
	e.settle(1)
	e.clock.Step(34 * time.Minute)
	second := e.nextSVID(updates).DefaultSVID()
	if serial(second) == serial(first) {
		t.Fatal("rotation streamed the same certificate")
	}
	if !second.Certificates[0].NotBefore.Equal(start.Add(34 * time.Minute)) {
		t.Fatalf("rotated certificate starts %s, want the injected clock's now", second.Certificates[0].NotBefore)
	}
	calls := e.ca.Calls()
	if last := calls[len(calls)-1]; last.Token != "" || last.ClientID != ownID {
		t.Fatalf("renewal call %+v, want the client certificate of %s and no token", last, ownID)
	}
	got = sdsStream.recvUntil(t, sds.CertificateName)
	checkSDSCert(t, got[sds.CertificateName], second)

	// The files follow too.
	waitFor(t, func() bool {
		b, err := os.ReadFile(filepath.Join(cfg.CertDir, certdir.CertChainFile))
		return err == nil && strings.Contains(string(b), pemOf(second.Certificates[0]))
	}, "cert-chain.pem to hold the rotated certificate")

	// A new root reaches workloads and Envoy before anything is signed
	// under it.
	next := testca.New(t, td, start)
	e.ca.SetBundleAuthorities(e.auth.Root, next.Root)
	u := e.nextSVID(updates)
	if b, _ := u.Bundles.Get(td); len(b.X509Authorities()) != 2 {
		t.Fatalf("bundle update carries %d roots, want 2", len(b.X509Authorities()))
	}
	got = sdsStream.recvUntil(t, sds.RootCAName)
	if n := strings.Count(string(got[sds.RootCAName].GetValidationContext().GetTrustedCa().GetInlineBytes()), "BEGIN CERTIFICATE"); n != 2 {
		t.Fatalf("ROOTCA holds %d roots after the bundle change, want 2", n)
	}
}

func TestCADownAtRenewal(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	e.start(cfg)
	updates := watch(t, cfg.SocketPath)
	first := e.nextSVID(updates).DefaultSVID()

	e.settle(1)
	e.ca.Stop()
	e.clock.Step(34 * time.Minute)
	// Renewal fails; the bundle stream broke too. Both back off on the
	// clock, and the old certificate is still served.
	e.settle(2)
	for range 3 {
		e.clock.Step(time.Minute)
		e.settle(2)
	}
	if got := fetch(t, cfg.SocketPath); serial(got) != serial(first) {
		t.Fatalf("while the CA is down the agent serves serial %s, want the current %s", serial(got), serial(first))
	}
	if n := counter(t, cfg.Registry, "trustmesh_agent_rotation_failures_total", rotation.ReasonUnavailable); n < 3 {
		t.Fatalf("ca_unavailable failures %v, want at least 3", n)
	}

	if err := e.ca.Start(); err != nil {
		t.Fatal(err)
	}
	e.clock.Step(time.Minute)
	renewed := e.nextSVID(updates).DefaultSVID()
	if serial(renewed) == serial(first) {
		t.Fatal("no renewal after the CA came back")
	}
	if got := fetch(t, cfg.SocketPath); serial(got) != serial(renewed) {
		t.Fatal("a new fetch does not return the renewed certificate")
	}
}

func TestRefusesAnotherIdentity(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	e.start(cfg)
	updates := watch(t, cfg.SocketPath)
	first := e.nextSVID(updates).DefaultSVID()

	e.settle(1)
	e.ca.SetIdentityOverride(otherID)
	e.clock.Step(34 * time.Minute)
	e.settle(1)
	e.clock.Step(time.Minute)
	e.settle(1)
	calls := e.ca.Calls()
	if last := calls[len(calls)-1]; last.Issued != otherID {
		t.Fatalf("CA issued to %s, the test needs it to issue to %s", last.Issued, otherID)
	}
	if got := fetch(t, cfg.SocketPath); got.ID != ownID || serial(got) != serial(first) {
		t.Fatalf("agent serves %s serial %s, want its own current certificate", got.ID, serial(got))
	}
	if n := counter(t, cfg.Registry, "trustmesh_agent_rotation_failures_total", rotation.ReasonIdentityMismatch); n < 2 {
		t.Fatalf("identity_mismatch failures %v, want at least 2", n)
	}
	select {
	case u := <-updates:
		t.Fatalf("workload was sent an update (%s) after a refused certificate", u.DefaultSVID().ID)
	default:
	}
}

func TestSocketRemovedWhileRunning(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	first := fetch(t, cfg.SocketPath)
	if err := os.Remove(cfg.SocketPath); err != nil {
		t.Fatal(err)
	}
	// The agent recreates the socket; a new client reaches it.
	if got := fetch(t, cfg.SocketPath); serial(got) != serial(first) {
		t.Fatal("recreated socket serves another certificate")
	}
	select {
	case err := <-r.done:
		t.Fatalf("agent exited: %v", err)
	default:
	}
}

func TestSocketTakenOverStopsAgent(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	r := e.start(cfg)
	fetch(t, cfg.SocketPath)
	tmp := cfg.SocketPath + ".x"
	if err := os.WriteFile(tmp, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, cfg.SocketPath); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-r.done:
		if err == nil || !strings.Contains(err.Error(), "socket") {
			t.Fatalf("agent exited with %v, want a socket error", err)
		}
		r.cancel = nil
	case <-time.After(20 * time.Second):
		t.Fatal("agent kept running after its socket path was taken over")
	}
}

func TestStateDirRenewsAfterRestartWithoutToken(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.StateDir = filepath.Join(e.dir, "state")
	r := e.start(cfg)
	first := fetch(t, cfg.SocketPath)
	waitFor(t, func() bool {
		_, err := os.Stat(filepath.Join(cfg.StateDir, "svid.pem"))
		return err == nil
	}, "state to be saved")
	r.stop(t)

	// Restart with no usable token: the join token is spent.
	cfg.JoinToken = ""
	cfg.JoinTokenFile = filepath.Join(e.dir, "no-such-token")
	cfg.Registry = prometheus.NewRegistry()
	e.start(cfg)
	updates := watch(t, cfg.SocketPath)
	restored := e.nextSVID(updates).DefaultSVID()
	if serial(restored) != serial(first) {
		t.Fatal("restarted agent does not serve its saved certificate")
	}
	e.settle(1)
	e.clock.Step(34 * time.Minute)
	renewed := e.nextSVID(updates).DefaultSVID()
	if serial(renewed) == serial(first) {
		t.Fatal("restarted agent did not renew")
	}
	calls := e.ca.Calls()
	if last := calls[len(calls)-1]; last.Token != "" || last.ClientID != ownID {
		t.Fatalf("renewal after restart %+v, want mTLS with the saved certificate", last)
	}
}

// problems counts the errors joined in err, however deeply.
func problems(err error) int {
	switch e := err.(type) {
	case interface{ Unwrap() []error }:
		n := 0
		for _, inner := range e.Unwrap() {
			n += problems(inner)
		}
		return n
	default:
		if inner := errors.Unwrap(err); inner != nil {
			return problems(inner)
		}
		return 1
	}
}

func TestValidate(t *testing.T) {
	dir := t.TempDir()
	bundle := filepath.Join(dir, "ca.pem")
	auth := testca.New(t, td, time.Now())
	if err := os.WriteFile(bundle, auth.RootPEM(), 0o600); err != nil {
		t.Fatal(err)
	}
	notPEM := filepath.Join(dir, "junk.pem")
	if err := os.WriteFile(notPEM, []byte("junk"), 0o600); err != nil {
		t.Fatal(err)
	}
	good := Config{CAAddress: "localhost:15012", CABundleFile: bundle}
	// As the injector writes it (injector/testdata/inject/probes.yaml.injected).
	const appProbers = `{"/app-health/rpc/readyz":{"grpc":{"port":9090,"service":"health"},"timeoutSeconds":2},"/app-health/web/livez":{"httpGet":{"path":"/livez","port":8080,"httpHeaders":[{"name":"X-Probe","value":"kubelet"}]}},"/app-health/web/readyz":{"tcpSocket":{"port":8080}}}`
	for _, tc := range []struct {
		name  string
		mod   func(*Config)
		valid bool
		// errs is how many problems must be reported at once.
		errs int
	}{
		{"defaults", func(*Config) {}, true, 0},
		{"join token file", func(c *Config) { c.JoinTokenFile = "/etc/trustmesh/join" }, true, 0},
		{"join token from env", func(c *Config) { c.JoinToken = "t" }, true, 0},
		{"everything", func(c *Config) {
			c.SPIFFEID, c.KeyType, c.CertTTL, c.SocketGroup = ownID.String(), "ec-p384", time.Hour, "0"
			c.MonitoringAddress, c.StateDir, c.CertDir = ":15024", dir, dir
		}, true, 0},
		{"no CA address", func(c *Config) { c.CAAddress = "" }, false, 1},
		{"CA address without port", func(c *Config) { c.CAAddress = "localhost" }, false, 1},
		{"no bundle", func(c *Config) { c.CABundleFile = "" }, false, 1},
		{"bundle not PEM", func(c *Config) { c.CABundleFile = notPEM }, false, 1},
		{"two tokens", func(c *Config) { c.JoinToken, c.JoinTokenFile = "t", "/f" }, false, 1},
		{"token file and join token", func(c *Config) { c.JoinToken, c.TokenFile = "t", "/f" }, false, 1},
		{"bad SPIFFE ID", func(c *Config) { c.SPIFFEID = "spiffe://Bad Domain/x" }, false, 1},
		{"bad key type", func(c *Config) { c.KeyType = "dsa" }, false, 1},
		{"negative TTL", func(c *Config) { c.CertTTL = -time.Second }, false, 1},
		{"unknown group", func(c *Config) { c.SocketGroup = "no-such-group-trustmesh" }, false, 1},
		{"bad monitoring address", func(c *Config) { c.MonitoringAddress = "15024" }, false, 1},
		{"app probers", func(c *Config) { c.MonitoringAddress, c.AppProbers = ":15020", appProbers }, true, 0},
		{"app probers without a monitoring address", func(c *Config) { c.AppProbers = appProbers }, false, 1},
		{"app probers not JSON", func(c *Config) { c.MonitoringAddress, c.AppProbers = ":15020", "{" }, false, 1},
		{"app probers at paths not the injector's", func(c *Config) {
			c.MonitoringAddress, c.AppProbers = ":15020", `{"/healthz":{"tcpSocket":{"port":8080}},"/app-health/web/ready":{"tcpSocket":{"port":8080}}}`
		}, false, 2},
		{"all problems at once", func(c *Config) { c.CAAddress, c.CABundleFile, c.KeyType = "", "", "dsa" }, false, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := good
			tc.mod(&cfg)
			err := Validate(cfg)
			if tc.valid {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatal("invalid config accepted")
			}
			if n := problems(err); n != tc.errs {
				t.Fatalf("%d problems reported, want %d: %v", n, tc.errs, err)
			}
		})
	}
}

// sdsClient is an Envoy-like SDS stream over the agent's socket.
type sdsClient struct {
	stream secretv3.SecretDiscoveryService_StreamSecretsClient
	names  []string
}

func newSDS(t *testing.T, socketPath string) *sdsClient {
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
func (c *sdsClient) recvUntil(t *testing.T, names ...string) map[string]*tlsv3.Secret {
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

func checkSDSCert(t *testing.T, secret *tlsv3.Secret, want *x509svid.SVID) {
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

func counter(t *testing.T, reg *prometheus.Registry, name, reason string) float64 {
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

func waitFor(t *testing.T, cond func() bool, what string) {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// testWriter sends the agent's log to the test's log.
type testWriter struct{ t *testing.T }

var logMu sync.Mutex

func (w testWriter) Write(p []byte) (int, error) {
	logMu.Lock()
	defer logMu.Unlock()
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// TestRefusedJoinTokenStopsAgent: an agent whose join token the CA refuses
// exits with an error that says to create a new token, rather than retrying
// for ever.
func TestRefusedJoinTokenStopsAgent(t *testing.T) {
	e := newEnv(t)
	cfg := e.config()
	cfg.JoinToken = "a-token-the-ca-never-made"
	r := e.start(cfg)
	select {
	case err := <-r.done:
		r.cancel = nil // it stopped; nothing to wait for
		var refused *rotation.JoinTokenRefusedError
		if !errors.As(err, &refused) || !strings.Contains(err.Error(), "trustmesh ca token create --data-dir") {
			t.Fatalf("agent exited with %v; want the join token refusal and what to do", err)
		}
		if msg := err.Error(); !strings.HasPrefix(msg, "agent: rotation: the CA refused") {
			t.Errorf("agent exited with %q; want it to name the part once", msg)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("agent kept running with a refused join token")
	}
}
