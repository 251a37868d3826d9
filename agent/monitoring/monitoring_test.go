package monitoring

import (
	"context"
	"crypto/ecdsa"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/apphealth"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	"github.com/trustmesh/trustmesh/api/probe"
	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/internal/connlimit/connlimittest"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	own   = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	start = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
)

func get(t *testing.T, h http.Handler, path string) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, path, nil))
	return rec.Code, rec.Body.String()
}

func TestHealthAndExpiryMetric(t *testing.T) {
	auth := testca.New(t, td, start)
	cert := auth.SVID(t, own, start, time.Hour)
	fc := clocktesting.NewFakeClock(start)
	store := identity.New()
	s, err := New(Config{Source: store, Clock: fc, Registry: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	h := s.Handler()

	steps := []struct {
		name   string
		do     func()
		code   int
		expiry string
	}{
		{"nothing yet", func() {}, http.StatusServiceUnavailable, "0"},
		{"bundle only", func() { store.SetBundle(auth.Bundle()) }, http.StatusServiceUnavailable, "0"},
		{"certificate", func() { store.SetSVID(cert) }, http.StatusOK,
			strconv.FormatInt(start.Add(time.Hour).Unix(), 10)},
		{"certificate expired", func() { fc.Step(time.Hour) }, http.StatusServiceUnavailable,
			strconv.FormatInt(start.Add(time.Hour).Unix(), 10)},
	}
	for _, st := range steps {
		st.do()
		if code, body := get(t, h, "/healthz"); code != st.code {
			t.Fatalf("%s: /healthz %d (%s), want %d", st.name, code, strings.TrimSpace(body), st.code)
		}
		_, metrics := get(t, h, "/metrics")
		want := "trustmesh_agent_svid_expiry_timestamp_seconds " + st.expiry
		if !strings.Contains(metrics, want) {
			// Prometheus may print large values in exponent form.
			f, _ := strconv.ParseFloat(st.expiry, 64)
			if !strings.Contains(metrics, "trustmesh_agent_svid_expiry_timestamp_seconds "+strconv.FormatFloat(f, 'g', -1, 64)) {
				t.Fatalf("%s: metrics lack %q:\n%s", st.name, want, metrics)
			}
		}
	}
}

func TestRunReturnsListenError(t *testing.T) {
	taken, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer taken.Close()
	s, err := New(Config{Address: taken.Addr().String(), Source: identity.New(), Clock: clocktesting.NewFakeClock(start), Registry: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := s.Run(ctx); err == nil || errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Run on a taken address returned %v, want the listen error", err)
	}
}

func TestRunServesUntilCanceled(t *testing.T) {
	s, err := New(Config{Address: "127.0.0.1:0", Source: identity.New(), Clock: clocktesting.NewFakeClock(start), Registry: prometheus.NewRegistry()})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- s.Run(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for s.Addr() == nil {
		if time.Now().After(deadline) {
			t.Fatal("never listened")
		}
		time.Sleep(time.Millisecond)
	}
	resp, err := http.Get("http://" + s.Addr().String() + "/healthz")
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusServiceUnavailable {
		t.Fatalf("/healthz %d before any identity, want 503", resp.StatusCode)
	}
	http.DefaultClient.CloseIdleConnections()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v", err)
	}
}

// TestServesOnlyWhatAnyoneMaySee pins what the port open to the pod
// network serves: /healthz, /metrics and the configured /app-health/
// paths, nothing else, and never the private key.
func TestServesOnlyWhatAnyoneMaySee(t *testing.T) {
	auth := testca.New(t, td, start)
	cert := auth.SVID(t, own, start, time.Hour)
	scalar, err := cert.PrivateKey.(*ecdsa.PrivateKey).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	secrets := []string{"PRIVATE KEY", hex.EncodeToString(scalar), base64.StdEncoding.EncodeToString(scalar)[:40]}
	store := identity.New()
	store.SetBundle(auth.Bundle())
	store.SetSVID(cert)

	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	probes, err := apphealth.New(apphealth.Config{Probers: probe.Probers{
		probe.Path("web", probe.Readiness): {TCPSocket: &probe.TCPSocket{Port: int32(app.Addr().(*net.TCPAddr).Port)}},
	}})
	if err != nil {
		t.Fatal(err)
	}

	for _, withProbes := range []bool{false, true} {
		cfg := Config{Source: store, Clock: clocktesting.NewFakeClock(start), Registry: prometheus.NewRegistry()}
		if withProbes {
			cfg.AppHealth = probes
		}
		s, err := New(cfg)
		if err != nil {
			t.Fatal(err)
		}
		appHealth := http.StatusNotFound
		if withProbes {
			appHealth = http.StatusOK
		}
		for _, tc := range []struct {
			method, path string
			want         int
		}{
			{http.MethodGet, "/healthz", http.StatusOK},
			{http.MethodHead, "/healthz", http.StatusOK},
			{http.MethodGet, "/metrics", http.StatusOK},
			{http.MethodGet, probe.Path("web", probe.Readiness), appHealth},
			{http.MethodGet, probe.Path("web", probe.Liveness), http.StatusNotFound},
			{http.MethodGet, "/app-health/", http.StatusNotFound},
			{http.MethodPost, "/healthz", http.StatusMethodNotAllowed},
			{http.MethodGet, "/", http.StatusNotFound},
			{http.MethodGet, "/debug/pprof/", http.StatusNotFound},
			{http.MethodGet, "/debug/pprof/goroutine", http.StatusNotFound},
			{http.MethodGet, "/debug/vars", http.StatusNotFound},
			{http.MethodGet, "/config_dump", http.StatusNotFound},
			{http.MethodGet, "/certs", http.StatusNotFound},
			{http.MethodGet, "/svid", http.StatusNotFound},
		} {
			rec := httptest.NewRecorder()
			s.Handler().ServeHTTP(rec, httptest.NewRequest(tc.method, tc.path, nil))
			if rec.Code != tc.want {
				t.Errorf("probes %t: %s %s: %d, want %d", withProbes, tc.method, tc.path, rec.Code, tc.want)
			}
			for _, secret := range secrets {
				if strings.Contains(rec.Body.String(), secret) {
					t.Errorf("probes %t: %s %s shows the private key", withProbes, tc.method, tc.path)
				}
			}
		}
	}
}

// TestRunBoundsConnections: the port is open to the pod network, so idle
// connections are closed and no more than the cap are served at once.
func TestRunBoundsConnections(t *testing.T) {
	serve := func(t *testing.T, limits connlimit.Config) string {
		s, err := New(Config{Address: "127.0.0.1:0", Source: identity.New(), Clock: clocktesting.NewFakeClock(start),
			Registry: prometheus.NewRegistry(), Connections: limits})
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- s.Run(ctx) }()
		t.Cleanup(func() {
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Errorf("Run returned %v", err)
			}
		})
		deadline := time.Now().Add(10 * time.Second)
		for s.Addr() == nil {
			if time.Now().After(deadline) {
				t.Fatal("never listened")
			}
			time.Sleep(time.Millisecond)
		}
		return s.Addr().String()
	}
	t.Run("idle", func(t *testing.T) {
		addr := serve(t, connlimit.Config{IdleTimeout: 300 * time.Millisecond, HandshakeTimeout: 300 * time.Millisecond})
		connlimittest.ClosesIdle(t, addr, connlimittest.HTTP(nil, "/healthz"), 5*time.Second)
		connlimittest.ClosesIdle(t, addr, connlimittest.Silent, 5*time.Second)
	})
	t.Run("cap", func(t *testing.T) {
		connlimittest.CapHolds(t, serve(t, connlimit.Config{MaxConnections: 8}), 8, connlimittest.HTTP(nil, "/healthz"))
	})
}

// With a Health function, /healthz answers what it says, whatever the
// store holds: the node agent's health is its holder's, not one SVID's.
func TestHealthFunctionDecides(t *testing.T) {
	var why error = errors.New("cannot fetch the node's entries: unavailable")
	s, err := New(Config{
		Source: identity.New(), Clock: clocktesting.NewFakeClock(start), Registry: prometheus.NewRegistry(),
		Health: func() (string, error) { return "node-a holds 3 identities", why },
	})
	if err != nil {
		t.Fatal(err)
	}
	if code, body := get(t, s.Handler(), "/healthz"); code != http.StatusServiceUnavailable || !strings.Contains(body, "cannot fetch the node's entries") {
		t.Errorf("unhealthy: got %d %q", code, body)
	}
	why = nil
	if code, body := get(t, s.Handler(), "/healthz"); code != http.StatusOK || !strings.Contains(body, "node-a holds 3 identities") {
		t.Errorf("healthy (with an empty store): got %d %q", code, body)
	}
}

// TestHealthSaysWhy: with Why set, an unhealthy /healthz answers why the
// agent has no valid certificate (rotation.Manager.Health), and a healthy
// one is unchanged.
func TestHealthSaysWhy(t *testing.T) {
	auth := testca.New(t, td, start)
	fc := clocktesting.NewFakeClock(start)
	store := identity.New()
	store.SetBundle(auth.Bundle())
	why := "certificate expired at 2030-01-01T01:00:00Z; the CA at ca.test:8443 unreachable since 2030-01-01T00:30:00Z: connection refused"
	s, err := New(Config{Source: store, Clock: fc, Registry: prometheus.NewRegistry(), Why: func() error {
		snap, _ := store.Load()
		if snap.SVID != nil && fc.Now().Before(snap.SVID.Certificates[0].NotAfter) {
			return nil
		}
		return errors.New(why)
	}})
	if err != nil {
		t.Fatal(err)
	}
	store.SetSVID(auth.SVID(t, own, start, time.Hour))
	if code, body := get(t, s.Handler(), "/healthz"); code != http.StatusOK || !strings.HasPrefix(body, "ok: ") {
		t.Fatalf("with a valid certificate: /healthz %d %q", code, body)
	}
	fc.Step(time.Hour)
	if code, body := get(t, s.Handler(), "/healthz"); code != http.StatusServiceUnavailable || strings.TrimSpace(body) != why {
		t.Fatalf("after expiry: /healthz %d %q, want 503 %q", code, body, why)
	}
}
