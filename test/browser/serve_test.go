package browser

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/internal/freeport"
)

const td = "spiffe://cluster.local"

// The mesh: two services in namespace shop, each with the identity of one
// of the two agents the tests enrol.
const (
	webID    = td + "/ns/shop/sa/web"
	ordersID = td + "/ns/shop/sa/orders"
	evilID   = td + "/ns/shop/sa/evil"

	webAddr    = "10.0.1.1"
	ordersAddr = "10.0.1.2"
)

const meshYAML = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
  endpoints:
  - {address: 10.0.1.1, pod: web-0, spiffeID: "spiffe://cluster.local/ns/shop/sa/web", labels: {app: web}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: orders, namespace: shop}
spec:
  ports: [{name: http, port: 8080, protocol: HTTP}]
  endpoints:
  - {address: 10.0.1.2, pod: orders-0, spiffeID: "spiffe://cluster.local/ns/shop/sa/orders", labels: {app: orders}}
`

// istioPrincipal is a SPIFFE ID as Istio's principals name it: without
// the scheme.
func istioPrincipal(id string) string { return strings.TrimPrefix(id, "spiffe://") }

// ordersPolicy lets only the identity it names call orders.
func ordersPolicy(id string) []byte {
	return []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders-callers, namespace: shop}
spec:
  selector: {matchLabels: {app: orders}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["` + istioPrincipal(id) + `"]
`)
}

// xssMarkup is markup that runs script if a page inserts it as HTML; each
// sets window.__tmxss.
var xssMarkup = []string{
	`<img src=x onerror=window.__tmxss=1>`,
	`<script>window.__tmxss=2</script>`,
	`<svg/onload=window.__tmxss=3>`,
}

// webPolicy lets orders call web only with a header whose values are
// markup: the access view shows them as the cell's condition. The header
// is one the decision log's default allowlist names (user-agent), since
// the access view redacts the values of other headers.
var webPolicy = []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: web-callers, namespace: shop}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from:
    - source:
        principals: ["` + istioPrincipal(ordersID) + `"]
    when:
    - key: request.headers[user-agent]
      values: ['` + strings.Join(xssMarkup, `', '`) + `']
`)

// server is a running `trustmesh serve` with two agents enrolled.
type server struct {
	dir, dataDir, policyDir string
	ca, monitoring, authz   string
	ui                      string // host:port of --listen-ui
	roots                   *x509.CertPool
	// client is the web agent's certificate, from its --cert-dir: the
	// ext_authz client presents it as a sidecar's Envoy would.
	client tls.Certificate

	procs []*proc
	conn  *grpc.ClientConn
}

type proc struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{}
	mu     sync.Mutex
	log    []string
}

// startProc runs the binary; its stderr's last lines are kept.
func startProc(name string, args ...string) (*proc, error) {
	p := &proc{name: name, cmd: exec.Command(bin, args...), exited: make(chan struct{})}
	pr, pw := io.Pipe()
	p.cmd.Stderr = pw
	if err := p.cmd.Start(); err != nil {
		return nil, err
	}
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.log = append(p.log, sc.Text())
			if len(p.log) > 200 {
				p.log = p.log[len(p.log)-200:]
			}
			p.mu.Unlock()
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	go func() { _ = p.cmd.Wait(); pw.Close(); <-logDone; close(p.exited) }()
	return p, nil
}

func (p *proc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

func (p *proc) lastLog() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return fmt.Sprintf("--- trustmesh %s:\n%s", p.name, strings.Join(p.log, "\n"))
}

// stop ends the process: SIGTERM, then SIGKILL after 10 s.
func (p *proc) stop() {
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// startServer starts serve with the mesh and policies above, on free
// loopback ports, and enrols an agent for web and one for orders.
func startServer() (_ *server, err error) {
	dir, err := os.MkdirTemp("", "trustmesh-browser-serve-")
	if err != nil {
		return nil, err
	}
	s := &server{dir: dir, dataDir: filepath.Join(dir, "data"), policyDir: filepath.Join(dir, "policies")}
	defer func() {
		if err != nil {
			err = fmt.Errorf("%w\n%s", err, s.logs())
			s.stop()
		}
	}()
	meshDir := filepath.Join(dir, "mesh")
	for _, f := range []struct {
		path string
		b    []byte
	}{
		{filepath.Join(meshDir, "mesh.yaml"), []byte(meshYAML)},
		{filepath.Join(s.policyDir, "orders.yaml"), ordersPolicy(webID)},
		{filepath.Join(s.policyDir, "web.yaml"), webPolicy},
	} {
		if err := os.MkdirAll(filepath.Dir(f.path), 0o700); err != nil {
			return nil, err
		}
		if err := os.WriteFile(f.path, f.b, 0o600); err != nil {
			return nil, err
		}
	}
	addrs, err := freePorts(4)
	if err != nil {
		return nil, err
	}
	s.ca, s.monitoring, s.authz, s.ui = addrs[0], addrs[1], addrs[2], addrs[3]
	serve, err := startProc("serve", "serve", "--data-dir", s.dataDir, "--kubernetes", "off",
		"--listen-ca", s.ca, "--listen-monitoring", s.monitoring, "--listen-bundle", "",
		"--listen-authz", s.authz, "--listen-ui", s.ui, "--policies", s.policyDir, "--mesh", meshDir,
		"--decision-log", filepath.Join(dir, "decisions.log"))
	if err != nil {
		return nil, err
	}
	s.procs = append(s.procs, serve)
	if err := waitOK(serve, "http://"+s.monitoring+"/readyz"); err != nil {
		return nil, err
	}
	bundle, err := cli("ca", "bundle", "--data-dir", s.dataDir)
	if err != nil {
		return nil, err
	}
	s.roots = x509.NewCertPool()
	if !s.roots.AppendCertsFromPEM(bundle) {
		return nil, errors.New("trustmesh ca bundle printed no certificates")
	}
	bundleFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(bundleFile, bundle, 0o600); err != nil {
		return nil, err
	}
	agentPorts, err := freePorts(2)
	if err != nil {
		return nil, err
	}
	for i, id := range []string{webID, ordersID} {
		name := id[strings.LastIndex(id, "/")+1:]
		token, err := cli("ca", "token", "create", "--data-dir", s.dataDir, "--spiffe-id", id, "--ttl", "10m")
		if err != nil {
			return nil, err
		}
		tokenFile := filepath.Join(dir, name+".token")
		if err := os.WriteFile(tokenFile, token, 0o600); err != nil {
			return nil, err
		}
		certDir := filepath.Join(dir, name+"-certs")
		a, err := startProc("agent "+name, "agent", "--ca-address", s.ca, "--ca-bundle", bundleFile,
			"--join-token-file", tokenFile, "--socket", filepath.Join(dir, name+".sock"),
			"--listen-monitoring", agentPorts[i], "--cert-dir", certDir)
		if err != nil {
			return nil, err
		}
		s.procs = append(s.procs, a)
		if err := waitOK(a, "http://"+agentPorts[i]+"/healthz"); err != nil {
			return nil, err
		}
		cert, err := waitCert(a, certDir)
		if err != nil {
			return nil, err
		}
		if id == webID {
			s.client = cert
		}
	}
	s.conn, err = grpc.NewClient(s.authz, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: s.roots, ServerName: "localhost", MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{s.client}})))
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (s *server) logs() string {
	var b strings.Builder
	for _, p := range s.procs {
		b.WriteString(p.lastLog())
		b.WriteString("\n")
	}
	return b.String()
}

func (s *server) stop() {
	if s.conn != nil {
		s.conn.Close()
	}
	// The agents first, then serve.
	for i := len(s.procs) - 1; i >= 0; i-- {
		s.procs[i].stop()
	}
	_ = os.RemoveAll(s.dir)
}

// alive fails the test when a process has exited.
func (s *server) alive(t *testing.T) {
	t.Helper()
	for _, p := range s.procs {
		if !p.running() {
			t.Fatalf("trustmesh %s has exited:\n%s", p.name, p.lastLog())
		}
	}
}

// uiURL is the page's address, with fragment.
func (s *server) uiURL(fragment string) string {
	u := "http://" + s.ui + "/ui/"
	if fragment != "" {
		u += "#" + fragment
	}
	return u
}

// writePolicy replaces one policy file, as an operator's edit would:
// written aside, then renamed over the old one.
func (s *server) writePolicy(t *testing.T, name string, b []byte) {
	t.Helper()
	tmp := filepath.Join(s.dir, name+".new")
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(s.policyDir, name)); err != nil {
		t.Fatal(err)
	}
}

// check is one ext_authz Check, as the Envoy in front of dst would send
// it for a request from src.
type check struct {
	src, srcAddr, dst, dstAddr string
	// dstLabels are the destination workload's labels, which Envoy sends
	// and policy selectors match.
	dstLabels  map[string]string
	host, path string
}

// decide sends c over mTLS to the authz port and returns the decision.
func (s *server) decide(t *testing.T, c check) codes.Code {
	t.Helper()
	addr := func(ip string, port uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
	}
	req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: c.src, Address: addr(c.srcAddr, 40000)},
		Destination: &authv3.AttributeContext_Peer{Principal: c.dst, Address: addr(c.dstAddr, 8080), Labels: c.dstLabels},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: c.path, Host: c.host, Scheme: "http", Protocol: "HTTP/1.1",
			Headers: map[string]string{":authority": c.host, ":method": "GET", ":path": c.path},
		}},
	}}
	client := authv3.NewAuthorizationClient(s.conn)
	deadline := time.Now().Add(30 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
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

// getJSON fetches a UI API path into v, as the page does.
func (s *server) getJSON(path string, v any) error {
	c := &http.Client{Timeout: 10 * time.Second}
	resp, err := c.Get("http://" + s.ui + path)
	if err != nil {
		return err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return err
	}
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("GET %s: %s: %s", path, resp.Status, b)
	}
	return json.Unmarshal(b, v)
}

func waitOK(p *proc, url string) error {
	c := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return nil
			}
		}
		if !p.running() {
			return fmt.Errorf("trustmesh %s exited before %s was OK", p.name, url)
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("%s not OK after 60s: %v", url, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// waitCert waits for the agent's --cert-dir to hold its certificate.
func waitCert(p *proc, dir string) (tls.Certificate, error) {
	deadline := time.Now().Add(60 * time.Second)
	for {
		cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"))
		if err == nil {
			return cert, nil
		}
		if !p.running() {
			return tls.Certificate{}, fmt.Errorf("trustmesh %s exited before writing its certificate", p.name)
		}
		if time.Now().After(deadline) {
			return tls.Certificate{}, fmt.Errorf("trustmesh %s wrote no certificate in 60s: %w", p.name, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// cli runs a trustmesh command and returns its standard output.
func cli(args ...string) ([]byte, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("trustmesh %s: %w: %s", strings.Join(args, " "), err, stderr.String())
	}
	return out, nil
}

// freePorts returns n loopback addresses that nothing listens on.
func freePorts(n int) ([]string, error) {
	var out []string
	for range n {
		a, err := freeport.Get()
		if err != nil {
			return nil, err
		}
		out = append(out, a)
	}
	return out, nil
}

var (
	sharedOnce sync.Once
	sharedSrv  *server
	sharedErr  error
)

// shared is the one server all tests use; TestMain stops it.
func shared(t *testing.T) *server {
	t.Helper()
	needTools(t)
	sharedOnce.Do(func() { sharedSrv, sharedErr = startServer() })
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	sharedSrv.alive(t)
	return sharedSrv
}

func stopShared() {
	if sharedSrv != nil {
		sharedSrv.stop()
	}
}
