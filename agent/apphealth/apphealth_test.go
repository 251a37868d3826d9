package apphealth_test

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/trustmesh/trustmesh/agent/apphealth"
	"github.com/trustmesh/trustmesh/api/probe"
	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

// seen is what an application server was asked.
type seen struct {
	Path, Query, Host string
	Header            http.Header
}

// app is an HTTP application on loopback that records every request.
type app struct {
	srv  *httptest.Server
	mu   sync.Mutex
	reqs []seen
}

func newApp(t *testing.T, tls bool, routes map[string]http.HandlerFunc) *app {
	t.Helper()
	a := &app{}
	h := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a.mu.Lock()
		a.reqs = append(a.reqs, seen{r.URL.Path, r.URL.RawQuery, r.Host, r.Header.Clone()})
		a.mu.Unlock()
		if route, ok := routes[r.URL.Path]; ok {
			route(w, r)
			return
		}
		http.NotFound(w, r)
	})
	a.srv = httptest.NewUnstartedServer(h)
	// Quiet: some cases speak plaintext to TLS on purpose.
	a.srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	if tls {
		a.srv.StartTLS()
	} else {
		a.srv.Start()
	}
	t.Cleanup(a.srv.Close)
	return a
}

func (a *app) port() int32 { return portOf(a.srv.Listener.Addr()) }

func (a *app) seen() []seen {
	a.mu.Lock()
	defer a.mu.Unlock()
	return append([]seen(nil), a.reqs...)
}

func portOf(addr net.Addr) int32 { return int32(addr.(*net.TCPAddr).Port) }

// canary is a TCP listener nothing may contact.
type canary struct {
	addr  string
	conns chan string
}

func newCanary(t *testing.T) *canary {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	c := &canary{addr: lis.Addr().String(), conns: make(chan string, 100)}
	done := make(chan struct{})
	go func() {
		defer close(done)
		defer close(c.conns)
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			c.conns <- conn.RemoteAddr().String()
			conn.Close()
		}
	}()
	t.Cleanup(func() {
		lis.Close()
		for range c.conns {
		}
		<-done
	})
	return c
}

func (c *canary) port() int32 {
	_, p, _ := net.SplitHostPort(c.addr)
	n, _ := strconv.Atoi(p)
	return int32(n)
}

// contacted returns the connections the canary accepted so far. It dials a
// sentinel connection itself and reads up to it: connections are accepted
// in the order they arrived, so none is missed and nothing waits on a
// timer.
func (c *canary) contacted(t *testing.T) []string {
	t.Helper()
	s, err := net.Dial("tcp", c.addr)
	if err != nil {
		t.Fatal(err)
	}
	defer s.Close()
	var others []string
	for a := range c.conns {
		if a == s.LocalAddr().String() {
			return others
		}
		others = append(others, a)
	}
	t.Fatal("canary closed before the sentinel arrived")
	return nil
}

// closedPort returns a loopback port nothing listens on: one below the
// ephemeral range, which no listener on port 0 and no outgoing
// connection is given, as a port just closed could be.
func closedPort(t *testing.T) int32 {
	t.Helper()
	p, err := strconv.ParseInt(freeport.Port(t), 10, 32)
	if err != nil {
		t.Fatal(err)
	}
	return int32(p)
}

func grpcServer(t *testing.T, impl healthpb.HealthServer) int32 {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	healthpb.RegisterHealthServer(s, impl)
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(lis) }()
	t.Cleanup(func() { s.Stop(); <-done })
	return portOf(lis.Addr())
}

// hangingHealth answers no health check until the caller gives up.
type hangingHealth struct {
	healthpb.UnimplementedHealthServer
}

func (hangingHealth) Check(ctx context.Context, _ *healthpb.HealthCheckRequest) (*healthpb.HealthCheckResponse, error) {
	<-ctx.Done()
	return nil, ctx.Err()
}

func standardHealth() *health.Server {
	h := health.NewServer()
	h.SetServingStatus("orders", healthpb.HealthCheckResponse_SERVING)
	h.SetServingStatus("billing", healthpb.HealthCheckResponse_NOT_SERVING)
	return h
}

func ptr[T any](v T) *T { return &v }

func newHandler(t *testing.T, probers probe.Probers) *apphealth.Handler {
	t.Helper()
	h, err := apphealth.New(apphealth.Config{Probers: probers})
	if err != nil {
		t.Fatal(err)
	}
	return h
}

func TestProbes(t *testing.T) {
	can := newCanary(t)
	plain := newApp(t, false, map[string]http.HandlerFunc{
		"/":     func(w http.ResponseWriter, _ *http.Request) {},
		"/ok":   func(w http.ResponseWriter, _ *http.Request) {},
		"/fail": func(w http.ResponseWriter, _ *http.Request) { w.WriteHeader(http.StatusInternalServerError) },
		"/kubelet-only": func(w http.ResponseWriter, r *http.Request) {
			if !strings.HasPrefix(r.UserAgent(), "kube-probe/") {
				w.WriteHeader(http.StatusForbidden)
			}
		},
		"/vhost": func(w http.ResponseWriter, r *http.Request) {
			if r.Host != "orders.internal" || r.Header.Get("X-Probe") != "kubelet" || r.URL.RawQuery != "deep=1" {
				w.WriteHeader(http.StatusBadRequest)
			}
		},
		"/named-host": func(w http.ResponseWriter, r *http.Request) {
			if r.Host != net.JoinHostPort("192.0.2.1", strconv.Itoa(int(portOf(r.Context().Value(http.LocalAddrContextKey).(net.Addr))))) {
				w.WriteHeader(http.StatusBadRequest)
			}
		},
		"/moved-here": func(w http.ResponseWriter, r *http.Request) { http.Redirect(w, r, "/fail", http.StatusFound) },
		"/moved-away": func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "http://localhost:"+strconv.Itoa(int(can.port()))+"/fail", http.StatusFound)
		},
		"/hang": func(w http.ResponseWriter, r *http.Request) { <-r.Context().Done() },
	})
	secure := newApp(t, true, map[string]http.HandlerFunc{"/ok": func(http.ResponseWriter, *http.Request) {}})
	grpcUp := grpcServer(t, standardHealth())
	grpcHung := grpcServer(t, hangingHealth{})
	closed := closedPort(t)

	get := func(path string, port int32) *probe.Prober {
		return &probe.Prober{HTTPGet: &probe.HTTPGet{Path: path, Port: port}}
	}
	cases := []struct {
		name   string
		prober *probe.Prober // nil: the path is not configured
		path   string        // only when prober is nil
		want   int
	}{
		{"http ok", get("/ok", plain.port()), "", http.StatusOK},
		{"http empty path is /", get("", plain.port()), "", http.StatusOK},
		{"http 500", get("/fail", plain.port()), "", http.StatusServiceUnavailable},
		{"http 404", get("/missing", plain.port()), "", http.StatusServiceUnavailable},
		{"http kube-probe user agent", get("/kubelet-only", plain.port()), "", http.StatusOK},
		{"http headers, Host and query", &probe.Prober{HTTPGet: &probe.HTTPGet{
			Path: "/vhost?deep=1", Port: plain.port(),
			HTTPHeaders: []probe.Header{{Name: "Host", Value: "orders.internal"}, {Name: "X-Probe", Value: "kubelet"}},
		}}, "", http.StatusOK},
		// 192.0.2.1 is TEST-NET-1: dialling it would time out.
		{"http host is sent, not dialled", &probe.Prober{HTTPGet: &probe.HTTPGet{Path: "/named-host", Port: plain.port(), Host: "192.0.2.1"}}, "", http.StatusOK},
		{"http redirect on the port is followed", get("/moved-here", plain.port()), "", http.StatusServiceUnavailable},
		{"http redirect elsewhere passes unfollowed", get("/moved-away", plain.port()), "", http.StatusOK},
		{"http refused", get("/ok", closed), "", http.StatusServiceUnavailable},
		{"http timeout", &probe.Prober{HTTPGet: &probe.HTTPGet{Path: "/hang", Port: plain.port()}, TimeoutSeconds: 1}, "", http.StatusServiceUnavailable},
		{"https ok", &probe.Prober{HTTPGet: &probe.HTTPGet{Path: "/ok", Port: secure.port(), Scheme: "HTTPS"}}, "", http.StatusOK},
		{"https to a plaintext server", &probe.Prober{HTTPGet: &probe.HTTPGet{Path: "/ok", Port: plain.port(), Scheme: "HTTPS"}}, "", http.StatusServiceUnavailable},
		{"http to a TLS server", get("/ok", secure.port()), "", http.StatusServiceUnavailable},

		{"tcp ok", &probe.Prober{TCPSocket: &probe.TCPSocket{Port: plain.port()}}, "", http.StatusOK},
		{"tcp host is not dialled", &probe.Prober{TCPSocket: &probe.TCPSocket{Port: plain.port(), Host: "192.0.2.1"}}, "", http.StatusOK},
		{"tcp refused", &probe.Prober{TCPSocket: &probe.TCPSocket{Port: closed}}, "", http.StatusServiceUnavailable},

		{"grpc server overall", &probe.Prober{GRPC: &probe.GRPC{Port: grpcUp}}, "", http.StatusOK},
		{"grpc serving service", &probe.Prober{GRPC: &probe.GRPC{Port: grpcUp, Service: ptr("orders")}}, "", http.StatusOK},
		{"grpc not serving", &probe.Prober{GRPC: &probe.GRPC{Port: grpcUp, Service: ptr("billing")}}, "", http.StatusServiceUnavailable},
		{"grpc unknown service", &probe.Prober{GRPC: &probe.GRPC{Port: grpcUp, Service: ptr("nope")}}, "", http.StatusServiceUnavailable},
		{"grpc refused", &probe.Prober{GRPC: &probe.GRPC{Port: closed}}, "", http.StatusServiceUnavailable},
		{"grpc timeout", &probe.Prober{GRPC: &probe.GRPC{Port: grpcHung}}, "", http.StatusServiceUnavailable},
		{"grpc not a gRPC server", &probe.Prober{GRPC: &probe.GRPC{Port: plain.port()}}, "", http.StatusServiceUnavailable},

		{"unknown container", nil, probe.Path("nobody", probe.Liveness), http.StatusNotFound},
		{"prefix only", nil, "/app-health/", http.StatusNotFound},
		{"container only", nil, "/app-health/c0", http.StatusNotFound},
		{"configured path with a suffix", nil, probe.Path("c0", probe.Liveness) + "/x", http.StatusNotFound},
		{"not under the prefix", nil, "/healthz", http.StatusNotFound},
	}
	probers := probe.Probers{}
	for i := range cases {
		if cases[i].prober != nil {
			cases[i].path = probe.Path(fmt.Sprintf("c%d", i), probe.Liveness)
			probers[cases[i].path] = cases[i].prober
		}
	}
	h := newHandler(t, probers)
	t.Run("group", func(t *testing.T) {
		for _, tc := range cases {
			t.Run(tc.name, func(t *testing.T) {
				// In parallel, so that the timeouts overlap.
				t.Parallel()
				begin := time.Now()
				rec := httptest.NewRecorder()
				h.ServeHTTP(rec, httptest.NewRequest(http.MethodGet, tc.path, nil))
				if rec.Code != tc.want {
					t.Fatalf("GET %s: %d %q, want %d", tc.path, rec.Code, rec.Body.String(), tc.want)
				}
				// A 1s timeout must not take much longer.
				if d := time.Since(begin); d > 5*time.Second {
					t.Fatalf("GET %s took %s", tc.path, d)
				}
			})
		}
	})
	if got := can.contacted(t); len(got) > 0 {
		t.Fatalf("a redirect reached another port: %v", got)
	}
}

// TestOnlyConfiguredTargets sends requests that try to steer the agent
// elsewhere, as anyone on the pod network may, and checks that the agent
// contacted nothing but the configured probes, with nothing of the
// caller's.
func TestOnlyConfiguredTargets(t *testing.T) {
	can := newCanary(t)
	canaryAt := can.addr
	web := newApp(t, false, map[string]http.HandlerFunc{
		"/livez": func(http.ResponseWriter, *http.Request) {},
		"/readyz": func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, "http://"+canaryAt+"/steal", http.StatusFound)
		},
	})
	rpc := grpcServer(t, standardHealth())
	h := newHandler(t, probe.Probers{
		probe.Path("web", probe.Liveness): {HTTPGet: &probe.HTTPGet{
			Path: "/livez?from=probe", Port: web.port(), HTTPHeaders: []probe.Header{{Name: "X-Probe", Value: "kubelet"}},
		}},
		probe.Path("web", probe.Readiness): {HTTPGet: &probe.HTTPGet{Path: "/readyz", Port: web.port()}},
		probe.Path("web", probe.Startup):   {TCPSocket: &probe.TCPSocket{Port: web.port()}},
		probe.Path("rpc", probe.Liveness):  {GRPC: &probe.GRPC{Port: rpc, Service: ptr("orders")}},
	})
	agent := httptest.NewServer(h)
	defer agent.Close()

	steer := "Host: " + canaryAt + "\r\nX-Forwarded-Host: " + canaryAt + "\r\nForwarded: host=" + canaryAt +
		"\r\nAuthorization: Bearer stolen\r\nX-Probe: attacker\r\nUser-Agent: attacker\r\n"
	for _, tc := range []struct {
		name, request string
		want          int
	}{
		{"absolute-form URI", "GET http://" + canaryAt + "/app-health/web/livez HTTP/1.1\r\n" + steer, http.StatusOK},
		{"steering headers and query", "GET /app-health/web/livez?host=127.0.0.1&port=" + strconv.Itoa(int(can.port())) + "&path=/steal HTTP/1.1\r\n" + steer, http.StatusOK},
		{"escaped slash names the same probe", "GET /app-health/web%2Flivez HTTP/1.1\r\n" + steer, http.StatusOK},
		{"tcp probe", "GET /app-health/web/startupz?port=" + strconv.Itoa(int(can.port())) + " HTTP/1.1\r\n" + steer, http.StatusOK},
		{"grpc probe", "GET /app-health/rpc/livez?service=billing HTTP/1.1\r\n" + steer, http.StatusOK},
		{"redirect to the canary is not followed", "GET /app-health/web/readyz HTTP/1.1\r\n" + steer, http.StatusOK},
		{"CONNECT", "CONNECT " + canaryAt + " HTTP/1.1\r\nHost: " + canaryAt + "\r\n", http.StatusNotFound},
		{"address as the container", "GET /app-health/" + canaryAt + "/livez HTTP/1.1\r\n" + steer, http.StatusNotFound},
		{"dot segments", "GET /app-health/web/livez/../../../" + canaryAt + " HTTP/1.1\r\n" + steer, http.StatusNotFound},
		{"scheme-relative path", "GET //" + canaryAt + "/app-health/web/livez HTTP/1.1\r\n" + steer, http.StatusNotFound},
		{"POST", "POST /app-health/web/livez HTTP/1.1\r\n" + steer + "Content-Length: 0\r\n", http.StatusOK},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if code := raw(t, agent.Listener.Addr().String(), tc.request+"Connection: close\r\n\r\n"); code != tc.want {
				t.Fatalf("%d, want %d", code, tc.want)
			}
		})
	}

	if got := can.contacted(t); len(got) > 0 {
		t.Fatalf("the agent contacted the canary %d times", len(got))
	}
	for _, r := range web.seen() {
		ok := (r.Path == "/livez" && r.Query == "from=probe" && r.Header.Get("X-Probe") == "kubelet") ||
			(r.Path == "/readyz" && r.Query == "" && r.Header.Get("X-Probe") == "")
		if !ok || r.Host != "localhost:"+strconv.Itoa(int(web.port())) ||
			len(r.Header.Values("X-Probe")) > 1 || r.Header.Get("Authorization") != "" ||
			r.Header.Get("X-Forwarded-Host") != "" || r.Header.Get("Forwarded") != "" ||
			!strings.HasPrefix(r.Header.Get("User-Agent"), "kube-probe/") {
			t.Errorf("the application was asked %+v", r)
		}
	}
}

// raw sends one request as text, so that nothing in a client tidies it,
// and returns the status code.
func raw(t *testing.T, addr, request string) int {
	t.Helper()
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

func TestNewRefuses(t *testing.T) {
	ok := &probe.Prober{TCPSocket: &probe.TCPSocket{Port: 8080}}
	live := probe.Path("web", probe.Liveness)
	for _, tc := range []struct {
		name    string
		probers probe.Probers
		errs    int
	}{
		{"not under the prefix", probe.Probers{"/healthz": ok}, 1},
		{"no kind", probe.Probers{"/app-health/web": ok}, 1},
		{"unknown kind", probe.Probers{"/app-health/web/ready": ok}, 1},
		{"empty container", probe.Probers{"/app-health//livez": ok}, 1},
		{"nested", probe.Probers{"/app-health/a/b/livez": ok}, 1},
		{"nil prober", probe.Probers{live: nil}, 1},
		{"no handler", probe.Probers{live: {}}, 1},
		{"two handlers", probe.Probers{live: {TCPSocket: ok.TCPSocket, GRPC: &probe.GRPC{Port: 8080}}}, 1},
		{"port zero", probe.Probers{live: {GRPC: &probe.GRPC{}}}, 1},
		{"port too large", probe.Probers{live: {HTTPGet: &probe.HTTPGet{Port: 70000}}}, 1},
		{"negative timeout", probe.Probers{live: {TCPSocket: ok.TCPSocket, TimeoutSeconds: -1}}, 1},
		{"unknown scheme", probe.Probers{live: {HTTPGet: &probe.HTTPGet{Port: 80, Scheme: "FTP"}}}, 1},
		{"bad header name", probe.Probers{live: {HTTPGet: &probe.HTTPGet{Port: 80, HTTPHeaders: []probe.Header{{Name: "Bad Name"}}}}}, 1},
		{"header value with a newline", probe.Probers{live: {HTTPGet: &probe.HTTPGet{Port: 80, HTTPHeaders: []probe.Header{{Name: "X", Value: "a\r\nHost: evil"}}}}}, 1},
		{"every problem at once", probe.Probers{"/healthz": ok, live: {}, probe.Path("web", probe.Startup): {GRPC: &probe.GRPC{}}}, 3},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := apphealth.New(apphealth.Config{Probers: tc.probers})
			if err == nil {
				t.Fatal("accepted")
			}
			n := 1
			var joined interface{ Unwrap() []error }
			if errors.As(err, &joined) {
				n = len(joined.Unwrap())
			}
			if n != tc.errs {
				t.Fatalf("%d problems reported, want %d: %v", n, tc.errs, err)
			}
		})
	}
}
