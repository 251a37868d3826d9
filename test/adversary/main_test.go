// Package adversary attacks a running `trustmesh serve` as an outsider
// would: over its loopback ports and, for the journal writer, through the
// database file in its data directory. Every test is an attack that must
// fail; the suite stays green only while trustmesh holds. README.md lists
// the attacks.
package adversary

import (
	"bufio"
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
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

	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

// bin is the trustmesh binary under attack, built once by TestMain.
var bin string

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "trustmesh-adversary-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// ADVERSARY_TRUSTMESH attacks another build, such as an older
	// release; by default the binary is built from this tree.
	if bin = os.Getenv("ADVERSARY_TRUSTMESH"); bin == "" {
		bin = filepath.Join(dir, "trustmesh")
		build := exec.Command("go", "build", "-o", bin, "github.com/trustmesh/trustmesh/cmd/trustmesh")
		build.Stdout, build.Stderr = os.Stderr, os.Stderr
		if err := build.Run(); err != nil {
			fmt.Fprintln(os.Stderr, "adversary: building trustmesh:", err)
			return 1
		}
	}
	code := m.Run()
	stopShared()
	if code != 0 {
		return code
	}
	return leakcheck.CheckOurs(os.Stderr)
}

// serveConfig is what one `trustmesh serve` process is started with.
type serveConfig struct {
	// policies and mesh are files (name → content) written to a policy
	// and a mesh directory; nil leaves the directory out.
	policies, mesh map[string][]byte
	// args are extra flags.
	args []string
}

// server is a running `trustmesh serve`.
type server struct {
	dataDir     string
	decisionLog string
	meshDir     string
	// Addresses, host:port on loopback.
	ca, monitoring, bundle, authz string
	// ui is the web UI's address, when a test turns it on (--listen-ui).
	ui    string
	roots *x509.CertPool

	cmd       *exec.Cmd
	exited    chan struct{}
	mu        sync.Mutex
	log       []string // the last lines of stderr
	onStopFns []func()
}

// startServer starts `trustmesh serve` on loopback ports, waits until it is
// ready, and returns it. stop ends it.
func startServer(cfg serveConfig) (*server, error) {
	dir, err := os.MkdirTemp("", "trustmesh-serve-")
	if err != nil {
		return nil, err
	}
	s := &server{dataDir: filepath.Join(dir, "data"), decisionLog: filepath.Join(dir, "decisions.log"), exited: make(chan struct{})}
	args := []string{"serve", "--data-dir", s.dataDir, "--kubernetes", "off", "--log-format", "json",
		"--listen-ca", "127.0.0.1:0", "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "127.0.0.1:0",
		"--listen-ui", "off", "--decision-log", s.decisionLog}
	if cfg.policies != nil {
		p := filepath.Join(dir, "policies")
		if err := writeFiles(p, cfg.policies); err != nil {
			return nil, err
		}
		// The authz port is not logged, so it is chosen here.
		if s.authz, err = freeport.Get(); err != nil {
			return nil, err
		}
		args = append(args, "--policies", p, "--listen-authz", s.authz)
	} else {
		args = append(args, "--listen-authz", "off")
	}
	if cfg.mesh != nil {
		s.meshDir = filepath.Join(dir, "mesh")
		if err := writeFiles(s.meshDir, cfg.mesh); err != nil {
			return nil, err
		}
		args = append(args, "--mesh", s.meshDir)
	}
	args = append(args, cfg.args...)
	s.cmd = exec.Command(bin, args...)
	s.cmd.Dir = dir
	// Through a pipe of our own, so that Wait returns only once the log
	// has been copied into it, and the last line before an exit is kept.
	pr, pw := io.Pipe()
	s.cmd.Stderr = pw
	if err := s.cmd.Start(); err != nil {
		return nil, err
	}
	addrs := make(chan map[string]any, 1)
	logDone := make(chan struct{})
	go func() { s.readLog(pr, addrs); close(logDone) }()
	go func() { _ = s.cmd.Wait(); pw.Close(); <-logDone; close(s.exited) }()
	fail := func(err error) (*server, error) {
		s.stop()
		return nil, fmt.Errorf("%w\n%s", err, s.lastLog())
	}
	select {
	case a := <-addrs:
		s.ca, _ = a["ca"].(string)
		s.monitoring, _ = a["monitoring"].(string)
		s.bundle, _ = a["bundle_endpoint"].(string)
		s.ui, _ = a["ui"].(string)
	case <-s.exited:
		return fail(fmt.Errorf("trustmesh serve exited at start: %v", s.cmd.ProcessState))
	case <-time.After(60 * time.Second):
		return fail(errors.New("trustmesh serve did not report its addresses within 60s"))
	}
	if err := s.waitReady(30 * time.Second); err != nil {
		return fail(err)
	}
	out, err := s.cli("ca", "bundle", "--data-dir", s.dataDir)
	if err != nil {
		return fail(err)
	}
	s.roots = x509.NewCertPool()
	if !s.roots.AppendCertsFromPEM(out) {
		return fail(errors.New("ca bundle printed no certificates"))
	}
	return s, nil
}

// readLog keeps the last lines of the server's log and reports the
// addresses from its "serving" line.
func (s *server) readLog(r io.Reader, addrs chan<- map[string]any) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	sent := false
	for sc.Scan() {
		line := sc.Text()
		s.mu.Lock()
		s.log = append(s.log, line)
		if len(s.log) > 200 {
			s.log = s.log[len(s.log)-200:]
		}
		s.mu.Unlock()
		if sent {
			continue
		}
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == "trustmesh control plane serving" {
			addrs <- rec
			sent = true
		}
	}
}

func (s *server) lastLog() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return strings.Join(s.log, "\n")
}

// logContains reports whether the server has logged a line containing sub.
func (s *server) logContains(sub string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, l := range s.log {
		if strings.Contains(l, sub) {
			return true
		}
	}
	return false
}

// running reports whether the process is still alive.
func (s *server) running() bool {
	select {
	case <-s.exited:
		return false
	default:
		return true
	}
}

func (s *server) waitReady(d time.Duration) error {
	deadline := time.Now().Add(d)
	for {
		code, err := s.get("/readyz")
		if err == nil && code == http.StatusOK {
			return nil
		}
		if !s.running() {
			return errors.New("trustmesh serve exited")
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("/readyz not 200 after %s: %d, %v", d, code, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// get asks the monitoring port for path and returns the status code.
func (s *server) get(path string) (int, error) {
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	resp, err := c.Get("http://" + s.monitoring + path)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	_, _ = io.Copy(io.Discard, resp.Body)
	return resp.StatusCode, nil
}

// onStop runs f when the server stops.
func (s *server) onStop(f func()) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.onStopFns = append(s.onStopFns, f)
}

// stop ends the process: SIGTERM, then SIGKILL after 10 s.
func (s *server) stop() {
	s.mu.Lock()
	fns := s.onStopFns
	s.onStopFns = nil
	s.mu.Unlock()
	for _, f := range fns {
		f()
	}
	if s.cmd.Process == nil {
		return
	}
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exited:
	case <-time.After(10 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exited
	}
	_ = os.RemoveAll(filepath.Dir(s.dataDir))
}

// cli runs a trustmesh subcommand and returns its standard output.
func (s *server) cli(args ...string) ([]byte, error) {
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

func writeFiles(dir string, files map[string][]byte) error {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return err
		}
	}
	return nil
}

// start starts a server of the test's own, stopped when the test ends.
func start(t *testing.T, cfg serveConfig) *server {
	t.Helper()
	s, err := startServer(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.stop)
	return s
}

var (
	sharedOnce sync.Once
	sharedSrv  *server
	sharedErr  error
)

// shared is the server most attacks share: the mesh and policies of
// fixtures.go, with the authorization service and the xDS server on.
// Attacks that would disturb others (floods, journal tampering, caps)
// start their own.
func shared(t *testing.T) *server {
	t.Helper()
	sharedOnce.Do(func() {
		var m map[string][]byte
		if m, sharedErr = meshFiles(); sharedErr == nil {
			sharedSrv, sharedErr = startServer(serveConfig{policies: policyFiles, mesh: m})
		}
	})
	if sharedErr != nil {
		t.Fatal(sharedErr)
	}
	if !sharedSrv.running() {
		t.Fatalf("the shared server has exited:\n%s", sharedSrv.lastLog())
	}
	return sharedSrv
}

func stopShared() {
	if sharedSrv != nil {
		sharedSrv.stop()
	}
}

// pemCerts encodes certificates as PEM.
func pemCerts(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}
