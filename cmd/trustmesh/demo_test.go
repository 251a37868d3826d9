package main

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/examples"
	"github.com/trustmesh/trustmesh/internal/freeport"
)

// TestDemoLogs runs `trustmesh demo` from a directory other than the
// repository, on the built-in mesh with a free echo port, at debug level:
// grpc-go's logs come through the command's slog logger (system=grpc, in
// its text format), none of its lines is grpc-go's own, and a healthy run
// logs no error.
func TestDemoLogs(t *testing.T) {
	meshDir := filepath.Join(t.TempDir(), "mesh")
	if err := os.CopyFS(meshDir, examples.Mesh()); err != nil {
		t.Fatal(err)
	}
	meshFile := filepath.Join(meshDir, "demo.yaml")
	b, err := os.ReadFile(meshFile)
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := strings.Cut(freeport.Addr(t), ":")
	if err := os.WriteFile(meshFile, []byte(strings.ReplaceAll(string(b), "17070", port)), 0o600); err != nil {
		t.Fatal(err)
	}

	var stdout, stderr syncBuffer
	cmd := exec.Command(binary, "demo", "--mesh", meshDir, "--interval", "200ms", "--log-level", "debug")
	cmd.Dir = t.TempDir()
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	for deadline := time.Now().Add(60 * time.Second); !strings.Contains(stdout.String(), "call 1: OK"); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("no successful call:\n%s\n%s", stdout.String(), stderr.String())
		}
	}
	logs := stderr.String()
	if err := cmd.Process.Signal(syscall.SIGINT); err != nil {
		t.Fatal(err)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatalf("trustmesh demo exited with %v:\n%s", err, stderr.String())
	}
	if !strings.Contains(logs, "system=grpc") {
		t.Errorf("no grpc-go record in the demo's log:\n%s", logs)
	}
	for _, line := range strings.Split(strings.TrimSpace(logs), "\n") {
		if !strings.HasPrefix(line, "time=") || strings.Contains(line, "level=ERROR") {
			t.Errorf("a healthy start logged %q", line)
		}
	}
}
