package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/internal/freeport"
)

// syncBuffer is a bytes.Buffer a test may read while a process writes it.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// repoRoot is where the README's commands run.
const repoRoot = "../.."

// The example policies work as shipped: `policy check` and `serve` with
// --policies examples/policies load the Rego bundle that the directory's
// bundles.txt names, with no --bundle.
func TestExamplePoliciesAsShipped(t *testing.T) {
	t.Run("policy check", func(t *testing.T) {
		cmd := exec.Command(binary, "policy", "check", "--policies", "examples/policies", "--request", "examples/policies/requests/productpage-get.json")
		cmd.Dir = repoRoot
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%v: %s", err, stderrOf(err))
		}
		var d struct {
			Allowed bool `json:"allowed"`
		}
		if err := json.Unmarshal(out, &d); err != nil || !d.Allowed {
			t.Fatalf("decision %s (%v), want allowed", out, err)
		}
	})
	t.Run("serve", func(t *testing.T) {
		monitoring := freeport.Addr(t)
		var stderr syncBuffer
		cmd := exec.Command(binary, "serve", "--policies", "examples/policies",
			"--data-dir", filepath.Join(t.TempDir(), "data"), "--listen-ca", freeport.Addr(t), "--listen-monitoring", monitoring,
			"--listen-authz", freeport.Addr(t), "--listen-bundle", "", "--listen-ui", "off")
		cmd.Dir, cmd.Stderr = repoRoot, &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		exited := make(chan error, 1)
		go func() { exited <- cmd.Wait() }()
		t.Cleanup(func() { _ = cmd.Process.Kill(); <-exited })
		deadline := time.After(30 * time.Second)
		for !strings.Contains(stderr.String(), `msg="policy set loaded"`) {
			select {
			case err := <-exited:
				exited <- err
				t.Fatalf("serve exited: %v\n%s", err, stderr.String())
			case <-deadline:
				t.Fatalf("serve did not load the policy set:\n%s", stderr.String())
			case <-time.After(20 * time.Millisecond):
			}
		}
		resp, err := http.Get("http://" + monitoring + "/readyz")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("/readyz = %d", resp.StatusCode)
		}
	})
}

// A serve whose CUSTOM policy needs a bundle that is not loaded is refused
// at start, saying so and what to do, never that a last good set is kept.
func TestServeRefusesAStartWithoutTheBundle(t *testing.T) {
	dir := t.TempDir()
	policy, err := os.ReadFile(filepath.Join(repoRoot, "examples/policies/00-mesh-ext-authz.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "ext.yaml"), policy, 0o600); err != nil {
		t.Fatal(err)
	}
	var stderr bytes.Buffer
	dataDir := filepath.Join(t.TempDir(), "data")
	cmd := exec.Command(binary, "serve", "--policies", dir,
		"--data-dir", dataDir, "--listen-ca", freeport.Addr(t), "--listen-monitoring", freeport.Addr(t),
		"--listen-authz", freeport.Addr(t), "--listen-bundle", "", "--listen-ui", "off")
	cmd.Stderr = &stderr
	done := make(chan error, 1)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { done <- cmd.Wait() }()
	select {
	case err = <-done:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		t.Fatalf("serve did not refuse to start:\n%s", stderr.String())
	}
	if err == nil {
		t.Fatal("serve exited 0")
	}
	lines := strings.Split(strings.TrimSpace(stderr.String()), "\n")
	last := lines[len(lines)-1]
	// The policies are checked with the rest of the configuration, before
	// anything is written, and the refusal names the flag.
	for _, want := range []string{"trustmesh: ", "invalid configuration: --policies", "data.envoy.authz.allow", "--bundle", filepath.Join(dir, "bundles.txt")} {
		if !strings.Contains(last, want) {
			t.Errorf("the error %q lacks %q", last, want)
		}
	}
	if strings.Contains(stderr.String(), "last good") {
		t.Errorf("a start with no policy set speaks of a last good one:\n%s", stderr.String())
	}
	if _, err := os.Stat(dataDir); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("the refused start created %s", dataDir)
	}
}
