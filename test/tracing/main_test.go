// Package tracing checks trustmesh's OpenTelemetry spans against a real
// receiver: an OpenTelemetry Collector (hack/otelcol.sh builds it, with the
// OTLP receiver and the file exporter) that the built `trustmesh serve`
// exports to over OTLP, in both protocols. The tests read the spans the
// collector wrote and assert their trees: parent-child links, the caller's
// W3C context, and the attributes.
//
// TRUSTMESH_OTELCOL names the collector binary; `make test` sets it. Without
// it the tests skip and say so, unless TRUSTMESH_TRACING_TESTS=1 (which make
// test also sets): then a missing or unusable collector fails the package.
package tracing

import (
	"bufio"
	"context"
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

	"github.com/trustmesh/trustmesh/internal/freeport"
)

// bin is the trustmesh binary, built once by TestMain; collector is the
// OpenTelemetry Collector binary, "" when TRUSTMESH_OTELCOL is unset.
var bin, collector string

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	collector = os.Getenv("TRUSTMESH_OTELCOL")
	if err := collectorUsable(collector); err != nil {
		if os.Getenv("TRUSTMESH_TRACING_TESTS") == "1" {
			fmt.Fprintf(os.Stderr, "tracing tests: %v (TRUSTMESH_TRACING_TESTS=1: make test builds it; run it, or set TRUSTMESH_OTELCOL=$(hack/otelcol.sh))\n", err)
			return 1
		}
		collector = ""
		return m.Run() // every test skips, saying why
	}
	dir, err := os.MkdirTemp("", "trustmesh-tracing-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin = filepath.Join(dir, "trustmesh")
	build := exec.Command("go", "build", "-o", bin, "github.com/trustmesh/trustmesh/cmd/trustmesh")
	build.Stdout, build.Stderr = os.Stderr, os.Stderr
	if err := build.Run(); err != nil {
		fmt.Fprintln(os.Stderr, "tracing: building trustmesh:", err)
		return 1
	}
	return m.Run()
}

// collectorUsable says why path cannot be the collector binary, nil when it
// can: set, and an executable regular file.
func collectorUsable(path string) error {
	if path == "" {
		return errors.New("TRUSTMESH_OTELCOL is unset")
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("TRUSTMESH_OTELCOL: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Mode().Perm()&0o111 == 0 {
		return fmt.Errorf("TRUSTMESH_OTELCOL: %s is not an executable file", path)
	}
	return nil
}

func needCollector(t *testing.T) {
	t.Helper()
	if collector == "" {
		t.Skip("TRUSTMESH_OTELCOL is unset or unusable: it names the OpenTelemetry Collector that hack/otelcol.sh builds (make test sets it)")
	}
}

// process is a running child process whose stderr is kept.
type process struct {
	cmd    *exec.Cmd
	exited chan struct{}
	mu     sync.Mutex
	log    []string
}

func startProcess(t *testing.T, cmd *exec.Cmd, onLine func(string)) *process {
	t.Helper()
	p := &process{cmd: cmd, exited: make(chan struct{})}
	pr, pw := io.Pipe()
	cmd.Stderr = pw
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	logDone := make(chan struct{})
	go func() {
		defer close(logDone)
		sc := bufio.NewScanner(pr)
		sc.Buffer(make([]byte, 64<<10), 1<<20)
		for sc.Scan() {
			line := sc.Text()
			p.mu.Lock()
			p.log = append(p.log, line)
			if len(p.log) > 300 {
				p.log = p.log[len(p.log)-300:]
			}
			p.mu.Unlock()
			if onLine != nil {
				onLine(line)
			}
		}
		_, _ = io.Copy(io.Discard, pr)
	}()
	go func() { _ = cmd.Wait(); pw.Close(); <-logDone; close(p.exited) }()
	t.Cleanup(p.stop)
	return p
}

func (p *process) lastLog() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.log, "\n")
}

func (p *process) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// stop ends the process: SIGTERM, then SIGKILL after 15 s.
func (p *process) stop() {
	if p.cmd.Process == nil {
		return
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.exited:
	case <-time.After(15 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// otelcol is a running collector that writes every span it receives to
// a file, as OTLP JSON, one export request a line.
type otelcol struct {
	*process
	grpc, http string // OTLP receiver addresses
	file       string
}

const collectorConfig = `receivers:
  otlp:
    protocols:
      grpc: {endpoint: "%s"}
      http: {endpoint: "%s"}
exporters:
  file:
    path: "%s"
    format: json
    flush_interval: 100ms
service:
  telemetry:
    logs: {level: info}
    metrics: {level: none}
  pipelines:
    traces: {receivers: [otlp], exporters: [file]}
`

func startCollector(t *testing.T) *otelcol {
	t.Helper()
	dir := t.TempDir()
	c := &otelcol{grpc: freeport.Addr(t), http: freeport.Addr(t), file: filepath.Join(dir, "spans.jsonl")}
	cfg := filepath.Join(dir, "otelcol.yaml")
	if err := os.WriteFile(cfg, fmt.Appendf(nil, collectorConfig, c.grpc, c.http, c.file), 0o600); err != nil {
		t.Fatal(err)
	}
	ready := make(chan struct{})
	var once sync.Once
	c.process = startProcess(t, exec.Command(collector, "--config", cfg), func(line string) {
		if strings.Contains(line, "Everything is ready") {
			once.Do(func() { close(ready) })
		}
	})
	select {
	case <-ready:
	case <-c.exited:
		t.Fatalf("the collector exited at start:\n%s", c.lastLog())
	case <-time.After(60 * time.Second):
		t.Fatalf("the collector was not ready within 60s:\n%s", c.lastLog())
	}
	return c
}

// serve is a running `trustmesh serve` on loopback ports.
type serve struct {
	*process
	dataDir       string
	ca, authz     string
	monitoring    string
	decisionLog   string
	caServingName string
}

// startServe starts `trustmesh serve` with the policies and the mesh (file
// name → YAML), the extra flags args and the OTEL_ variables env (no other
// OTEL_ variable of this process's environment), and waits until it is
// ready.
func startServe(t *testing.T, policies, mesh map[string]string, args, env []string) *serve {
	t.Helper()
	dir := t.TempDir()
	s := &serve{dataDir: filepath.Join(dir, "data"), authz: freeport.Addr(t), decisionLog: filepath.Join(dir, "decisions.log"), caServingName: "localhost"}
	pdir := filepath.Join(dir, "policies")
	if err := os.MkdirAll(pdir, 0o700); err != nil {
		t.Fatal(err)
	}
	mdir := filepath.Join(dir, "mesh")
	if err := os.MkdirAll(mdir, 0o700); err != nil {
		t.Fatal(err)
	}
	for d, files := range map[string]map[string]string{pdir: policies, mdir: mesh} {
		for name, y := range files {
			if err := os.WriteFile(filepath.Join(d, name), []byte(y), 0o600); err != nil {
				t.Fatal(err)
			}
		}
	}
	cmd := exec.Command(bin, append([]string{"serve", "--data-dir", s.dataDir, "--kubernetes", "off", "--log-format", "json",
		"--listen-ca", "127.0.0.1:0", "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "", "--listen-ui", "off",
		"--listen-authz", s.authz, "--policies", pdir, "--mesh", mdir, "--decision-log", s.decisionLog}, args...)...)
	cmd.Dir = dir
	// Only the test's OTEL_ variables: none of the environment's.
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, "OTEL_") {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	addrs := make(chan map[string]any, 1)
	var once sync.Once
	s.process = startProcess(t, cmd, func(line string) {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == "trustmesh control plane serving" {
			once.Do(func() { addrs <- rec })
		}
	})
	select {
	case a := <-addrs:
		s.ca, _ = a["ca"].(string)
		s.monitoring, _ = a["monitoring"].(string)
	case <-s.exited:
		t.Fatalf("trustmesh serve exited at start:\n%s", s.lastLog())
	case <-time.After(60 * time.Second):
		t.Fatalf("trustmesh serve did not report its addresses within 60s:\n%s", s.lastLog())
	}
	if s.ca == "" || s.monitoring == "" {
		t.Fatalf("trustmesh serve reported no CA or monitoring address:\n%s", s.lastLog())
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		resp, err := http.Get("http://" + s.monitoring + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				break
			}
		}
		if !s.running() || time.Now().After(deadline) {
			t.Fatalf("trustmesh serve not ready: %v\n%s", err, s.lastLog())
		}
		time.Sleep(100 * time.Millisecond)
	}
	return s
}

// cli runs a trustmesh subcommand and returns its standard output.
func cli(t *testing.T, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("trustmesh %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return strings.TrimSpace(string(out))
}

// errTimeout marks spans that did not arrive in time.
var errTimeout = errors.New("spans did not arrive in time")
