// Package ambientnet is the end-to-end test of ambient mode's node proxy
// with real traffic (issue 16): two "nodes" A and B as network namespaces
// routing between their pods, each pod a network namespace with a veth
// into its node's bridge (IPv4 and IPv6), a veth link between the nodes;
// `trustmesh serve` with mesh files and policies; a `trustmesh node
// --proxy` per node, capturing its pods; and unmodified apps (curl, an
// HTTP server, a TCP echo) that know nothing of the mesh.
//
// It creates network namespaces, bridges and veths, so it runs as root
// (make test does); as anyone else every test skips and says why.
package ambientnet

import (
	"bufio"
	"encoding/json"
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

	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/internal/binary"
)

var (
	// bin is the trustmesh binary, appBin the apps (./app).
	bin, appBin string
	skipReason  string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		skipReason = "the ambientnet tests create network namespaces, veths and iptables rules, which needs root (make test runs them as root)"
		return m.Run()
	}
	for _, tool := range []string{"ip", "iptables-restore", "nsenter", "tcpdump", "curl"} {
		if _, err := exec.LookPath(tool); err != nil {
			if _, err2 := os.Stat("/usr/sbin/" + tool); err2 != nil {
				fmt.Fprintf(os.Stderr, "ambientnet: %s is missing (hack/debian-tools.sh installs it): %v\n", tool, err)
				return 1
			}
		}
	}
	dir, err := os.MkdirTemp("", "trustmesh-ambientnet-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if bin, err = binary.BuildTrustmesh(dir, "AMBIENT_TRUSTMESH"); err != nil {
		fmt.Fprintln(os.Stderr, "ambientnet:", err)
		return 1
	}
	if appBin, err = binary.Build(dir, "github.com/trustmesh/trustmesh/test/ambientnet/app"); err != nil {
		fmt.Fprintln(os.Stderr, "ambientnet:", err)
		return 1
	}
	return m.Run()
}

func needRoot(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
}

// sh runs a command and fails the test when it fails.
func sh(t *testing.T, name string, args ...string) string {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
	return string(out)
}

// proc is a process the test started, with its output.
type proc struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{}
	err    error // the exit, once exited is closed

	mu    sync.Mutex
	lines []string
}

// start runs a process and stops it (SIGTERM, then SIGKILL) at cleanup.
func start(t *testing.T, name string, cmd *exec.Cmd) *proc {
	t.Helper()
	p := &proc{name: name, cmd: cmd, exited: make(chan struct{})}
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = pw, pw
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	logDone := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			p.mu.Lock()
			p.lines = append(p.lines, sc.Text())
			if len(p.lines) > 2000 {
				p.lines = p.lines[len(p.lines)-2000:]
			}
			p.mu.Unlock()
		}
		close(logDone)
	}()
	go func() { p.err = cmd.Wait(); pw.Close(); <-logDone; close(p.exited) }()
	t.Cleanup(func() {
		p.stop()
		if t.Failed() {
			t.Logf("%s output (last lines):\n%s", name, p.tail(80))
		}
	})
	return p
}

func (p *proc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

func (p *proc) stop() {
	if !p.running() {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

func (p *proc) output() []string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return append([]string(nil), p.lines...)
}

func (p *proc) tail(n int) string {
	l := p.output()
	if len(l) > n {
		l = l[len(l)-n:]
	}
	return strings.Join(l, "\n")
}

// waitLine waits until a line of p's output satisfies match.
func (p *proc) waitLine(t *testing.T, d time.Duration, what string, match func(string) bool) string {
	t.Helper()
	deadline := time.Now().Add(d)
	for {
		for _, l := range p.output() {
			if match(l) {
				return l
			}
		}
		if !p.running() {
			t.Fatalf("%s exited (%v) before %s:\n%s", p.name, p.err, what, p.tail(80))
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no %s within %s:\n%s", p.name, what, d, p.tail(80))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// server is a running `trustmesh serve`, off Kubernetes.
type server struct {
	*proc
	dataDir, meshDir, policyDir string
	ca, monitoring, authz       string
	bundleFile                  string
}

func startServe(t *testing.T, dir string, mesh, policies map[string]string) *server {
	t.Helper()
	s := &server{dataDir: filepath.Join(dir, "data"), meshDir: filepath.Join(dir, "mesh"), policyDir: filepath.Join(dir, "policies")}
	for _, d := range []string{s.meshDir, s.policyDir} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, c := range mesh {
		writeFile(t, filepath.Join(s.meshDir, name), c)
	}
	for name, c := range policies {
		writeFile(t, filepath.Join(s.policyDir, name), c)
	}
	s.authz = freeport.Addr(t)
	cmd := exec.Command(bin, "serve", "--data-dir", s.dataDir, "--kubernetes", "off", "--log-format", "json",
		"--listen-ca", "127.0.0.1:0", "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "",
		"--listen-authz", s.authz, "--listen-ui", "off", "--mesh", s.meshDir, "--policies", s.policyDir)
	s.proc = start(t, "trustmesh serve", cmd)
	line := s.waitLine(t, 90*time.Second, "serving line", func(l string) bool {
		return strings.Contains(l, `"trustmesh control plane serving"`)
	})
	var rec map[string]any
	if err := json.Unmarshal([]byte(line), &rec); err != nil {
		t.Fatal(err)
	}
	s.ca, _ = rec["ca"].(string)
	s.monitoring, _ = rec["monitoring"].(string)
	waitHTTP(t, "http://"+s.monitoring+"/readyz", 60*time.Second)
	s.bundleFile = filepath.Join(dir, "bundle.pem")
	writeFile(t, s.bundleFile, sh(t, bin, "ca", "bundle", "--data-dir", s.dataDir))
	return s
}

// writeFile writes atomically, as the watchers expect.
func writeFile(t *testing.T, path, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

func waitHTTP(t *testing.T, url string, d time.Duration) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second}
	deadline := time.Now().Add(d)
	for {
		resp, err := c.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not 200 after %s (%v)", url, d, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

// startNode joins and runs `trustmesh node --proxy` for name.
func startNode(t *testing.T, s *server, dir, name, nodeIP string) (*proc, string) {
	t.Helper()
	d := filepath.Join(dir, name)
	if err := os.MkdirAll(d, 0o755); err != nil {
		t.Fatal(err)
	}
	tok := filepath.Join(d, "token")
	writeFile(t, tok, sh(t, bin, "ca", "token", "create", "--data-dir", s.dataDir, "--node", name, "--ttl", "10m"))
	socket := filepath.Join(d, "node.sock")
	mon := freeport.Addr(t)
	cmd := exec.Command(bin, "node", "--node-name", name, "--ca-address", s.ca, "--ca-bundle-file", s.bundleFile,
		"--join-token-file", tok, "--state-dir", filepath.Join(d, "state"), "--socket", socket,
		"--monitoring-address", mon, "--sync-interval", "1s", "--pending-wait", "2s",
		"--proxy", "--authz-address", s.authz, "--node-ip", nodeIP)
	p := start(t, "trustmesh node "+name, cmd)
	return p, mon
}
