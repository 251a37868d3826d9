// Package apphealth runs the pod's own health probes for the kubelet.
//
// Envoy's inbound listeners accept only mesh mTLS, so the injector rewrites
// each HTTP, TCP and gRPC probe of a pod into a GET of
// /app-health/<container>/<livez|readyz|startupz> on the agent's monitoring
// port and hands the agent the originals (package api/probe). For each
// such path the Handler runs the original probe against the application on
// localhost, outside the mesh (the agent's uid is never captured), with the
// probe's timeout, as the kubelet would: an HTTP GET with the probe's path,
// port, scheme and headers, where 2xx and 3xx pass; a TCP connect; a gRPC
// grpc.health.v1.Health/Check of the probe's service, where SERVING passes.
// It answers 200 when the probe passes and 503 when it fails. A probe's host
// is never dialled, the application being on localhost; an HTTP probe still
// sends it in the Host header, as the kubelet would.
//
// The port is reachable from outside the pod without authentication, so the
// Handler is no proxy: a request picks one of the configured probes by its
// exact path and nothing else. It never forwards the caller's host, port,
// path, query or headers, follows a redirect only to the probe's own port,
// ignores proxy settings, and each probe's dialer refuses every address but
// the probe's own localhost port.
package apphealth

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"golang.org/x/net/http/httpguts"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"

	"github.com/trustmesh/trustmesh/api/probe"
)

// PathPrefix is the prefix of every path the Handler serves.
const PathPrefix = "/app-health/"

// host is where the application is probed: inside the pod, on loopback.
const host = "localhost"

// userAgent is sent unless a probe sets its own, so that applications that
// recognise the kubelet's probes by their "kube-probe/" agent still do.
const userAgent = "kube-probe/trustmesh"

// DefaultTimeout is a probe's timeout when it gives none, the kubelet's.
const DefaultTimeout = time.Second

// maxBody is how much of an HTTP probe's response is read, as the kubelet.
const maxBody = 10 << 10

// Config configures a Handler.
type Config struct {
	// Probers maps each /app-health/ path to the original probe behind it,
	// as probe.Decode returns them.
	Probers probe.Probers
	// Logger defaults to discarding.
	Logger *slog.Logger
}

// Handler serves the configured paths under PathPrefix; any other path is
// 404.
type Handler struct {
	log    *slog.Logger
	checks map[string]*check
}

// check is one configured probe, prepared when the config loads.
type check struct {
	path    string
	timeout time.Duration
	run     func(context.Context) error
	// failing holds whether the last result was a failure, so that only
	// changes are logged.
	failing atomic.Bool
}

// New checks every prober and prepares it. It reports all problems at once.
func New(cfg Config) (*Handler, error) {
	if cfg.Logger == nil {
		cfg.Logger = slog.New(slog.DiscardHandler)
	}
	h := &Handler{log: cfg.Logger, checks: make(map[string]*check, len(cfg.Probers))}
	var errs []error
	for path, p := range cfg.Probers {
		c, err := prepare(path, p, cfg.Logger)
		if err != nil {
			errs = append(errs, fmt.Errorf("apphealth: %s: %w", path, err))
			continue
		}
		h.checks[path] = c
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return h, nil
}

func prepare(path string, p *probe.Prober, log *slog.Logger) (*check, error) {
	if err := checkPath(path); err != nil {
		return nil, err
	}
	if p == nil {
		return nil, errors.New("empty prober")
	}
	c := &check{path: path, timeout: DefaultTimeout}
	switch {
	case p.TimeoutSeconds < 0:
		return nil, fmt.Errorf("negative timeout %ds", p.TimeoutSeconds)
	case p.TimeoutSeconds > 0:
		c.timeout = time.Duration(p.TimeoutSeconds) * time.Second
	}
	var err error
	switch n := countSet(p.HTTPGet != nil, p.TCPSocket != nil, p.GRPC != nil); {
	case n != 1:
		return nil, fmt.Errorf("a prober needs exactly one of httpGet, tcpSocket and grpc, has %d", n)
	case p.HTTPGet != nil:
		c.run, err = httpCheck(p.HTTPGet)
		if p.HTTPGet.Host != "" {
			log.Warn("probe host ignored: probing the application on localhost", "path", path, "host", p.HTTPGet.Host)
		}
	case p.TCPSocket != nil:
		c.run, err = tcpCheck(p.TCPSocket)
		if p.TCPSocket.Host != "" {
			log.Warn("probe host ignored: probing the application on localhost", "path", path, "host", p.TCPSocket.Host)
		}
	case p.GRPC != nil:
		c.run, err = grpcCheck(p.GRPC)
	}
	if err != nil {
		return nil, err
	}
	return c, nil
}

// checkPath accepts exactly the paths probe.Path makes.
func checkPath(path string) error {
	rest, ok := strings.CutPrefix(path, PathPrefix)
	container, kind, ok2 := strings.Cut(rest, "/")
	if !ok || !ok2 || container == "" || strings.Contains(kind, "/") {
		return fmt.Errorf("not a path of the form %s<container>/<kind>", PathPrefix)
	}
	switch probe.Kind(kind) {
	case probe.Liveness, probe.Readiness, probe.Startup:
	default:
		return fmt.Errorf("unknown probe kind %q", kind)
	}
	if probe.Path(container, probe.Kind(kind)) != path {
		return fmt.Errorf("not a path of the form %s<container>/<kind>", PathPrefix)
	}
	return nil
}

func countSet(set ...bool) int {
	n := 0
	for _, s := range set {
		if s {
			n++
		}
	}
	return n
}

func target(port int32) (string, error) {
	if port < 1 || port > 65535 {
		return "", fmt.Errorf("port %d is out of range", port)
	}
	return net.JoinHostPort(host, strconv.Itoa(int(port))), nil
}

// dialOnly returns a dialer that connects to addr and refuses any other
// address, whatever asks it to.
func dialOnly(addr string) func(ctx context.Context, network, to string) (net.Conn, error) {
	var d net.Dialer
	return func(ctx context.Context, network, to string) (net.Conn, error) {
		if to != addr || network != "tcp" {
			return nil, fmt.Errorf("apphealth: refusing to dial %s %s: the probe's address is %s", network, to, addr)
		}
		return d.DialContext(ctx, network, to)
	}
}

func httpCheck(g *probe.HTTPGet) (func(context.Context) error, error) {
	addr, err := target(g.Port)
	if err != nil {
		return nil, err
	}
	var scheme string
	switch {
	case g.Scheme == "" || strings.EqualFold(g.Scheme, "HTTP"):
		scheme = "http"
	case strings.EqualFold(g.Scheme, "HTTPS"):
		scheme = "https"
	default:
		return nil, fmt.Errorf("unknown scheme %q", g.Scheme)
	}
	// As the kubelet: the probe's path may carry a query; whatever else it
	// names, the scheme and address are the probe's.
	u, err := url.Parse(g.Path)
	if err != nil {
		u = &url.URL{Path: g.Path}
	}
	u.Scheme, u.Host, u.User = scheme, addr, nil
	rawURL := u.String()

	header := http.Header{}
	for _, hd := range g.HTTPHeaders {
		if !httpguts.ValidHeaderFieldName(hd.Name) || !httpguts.ValidHeaderFieldValue(hd.Value) {
			return nil, fmt.Errorf("invalid header %q", hd.Name)
		}
		header.Add(hd.Name, hd.Value)
	}
	if _, ok := header["User-Agent"]; !ok {
		header.Set("User-Agent", userAgent)
	}
	if _, ok := header["Accept"]; !ok {
		header.Set("Accept", "*/*")
	} else if header.Get("Accept") == "" {
		header.Del("Accept")
	}
	reqHost := header.Get("Host")
	if reqHost == "" && g.Host != "" {
		// The application sees the Host the kubelet would have sent.
		reqHost = net.JoinHostPort(g.Host, strconv.Itoa(int(g.Port)))
	}

	client := &http.Client{
		Transport: &http.Transport{
			Proxy:       nil,
			DialContext: dialOnly(addr),
			// As the kubelet: an HTTPS probe checks that the application
			// answers, not who it is. The connection stays on loopback.
			TLSClientConfig:   &tls.Config{InsecureSkipVerify: true}, //nolint:gosec // see above
			DisableKeepAlives: true,
		},
		CheckRedirect: func(req *http.Request, via []*http.Request) error {
			// As the kubelet, a redirect elsewhere passes without being
			// followed; unlike it, "elsewhere" includes another port.
			if req.URL.Host != addr {
				return http.ErrUseLastResponse
			}
			if len(via) >= 10 {
				return errors.New("stopped after 10 redirects")
			}
			return nil
		},
	}
	return func(ctx context.Context) error {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, rawURL, nil)
		if err != nil {
			return fmt.Errorf("apphealth: %w", err)
		}
		req.Header = header.Clone()
		req.Host = reqHost
		resp, err := client.Do(req)
		if err != nil {
			return fmt.Errorf("apphealth: %w", err)
		}
		defer resp.Body.Close()
		_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, maxBody))
		if resp.StatusCode < http.StatusOK || resp.StatusCode >= http.StatusBadRequest {
			return fmt.Errorf("apphealth: GET %s: HTTP %d", u.Path, resp.StatusCode)
		}
		return nil
	}, nil
}

func tcpCheck(s *probe.TCPSocket) (func(context.Context) error, error) {
	addr, err := target(s.Port)
	if err != nil {
		return nil, err
	}
	dial := dialOnly(addr)
	return func(ctx context.Context) error {
		conn, err := dial(ctx, "tcp", addr)
		if err != nil {
			return fmt.Errorf("apphealth: %w", err)
		}
		return conn.Close()
	}, nil
}

func grpcCheck(g *probe.GRPC) (func(context.Context) error, error) {
	addr, err := target(g.Port)
	if err != nil {
		return nil, err
	}
	var service string
	if g.Service != nil {
		service = *g.Service
	}
	dial := dialOnly(addr)
	return func(ctx context.Context) error {
		// A fresh connection per probe, as the kubelet: nothing is held
		// open between probes. passthrough hands addr to the dialer
		// untouched, with no resolver or service-config lookups.
		conn, err := grpc.NewClient("passthrough:///"+addr,
			grpc.WithTransportCredentials(insecure.NewCredentials()),
			grpc.WithContextDialer(func(ctx context.Context, to string) (net.Conn, error) {
				return dial(ctx, "tcp", to)
			}),
			grpc.WithUserAgent(userAgent),
		)
		if err != nil {
			return fmt.Errorf("apphealth: %w", err)
		}
		defer conn.Close()
		resp, err := healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{Service: service})
		if err != nil {
			return fmt.Errorf("apphealth: gRPC health check: %w", err)
		}
		if st := resp.GetStatus(); st != healthpb.HealthCheckResponse_SERVING {
			return fmt.Errorf("apphealth: gRPC service %q is %s", service, st)
		}
		return nil
	}, nil
}

// ServeHTTP runs the probe configured for r's exact path, if any. Nothing
// else of the request is used.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c, ok := h.checks[r.URL.Path]
	if !ok {
		http.NotFound(w, r)
		return
	}
	ctx, cancel := context.WithTimeout(r.Context(), c.timeout)
	err := c.run(ctx)
	cancel()
	if r.Context().Err() != nil {
		// The caller hung up: a probe cut short says nothing about the
		// application.
		return
	}
	if was := c.failing.Swap(err != nil); was != (err != nil) {
		if err != nil {
			h.log.Info("application probe failing", "path", c.path, "error", err)
		} else {
			h.log.Info("application probe passing", "path", c.path)
		}
	}
	if err != nil {
		h.log.Debug("application probe failed", "path", c.path, "error", err)
		// The reason stays in the agent's log: callers are not
		// authenticated.
		http.Error(w, "application probe failed", http.StatusServiceUnavailable)
		return
	}
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	_, _ = io.WriteString(w, "ok\n")
}
