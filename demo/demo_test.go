package demo_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/demo"
)

// lines collects the demo's output and lets the test wait for a line.
type lines struct {
	mu    sync.Mutex
	text  strings.Builder
	added chan struct{}
}

func (l *lines) Write(p []byte) (int, error) {
	l.mu.Lock()
	l.text.Write(p)
	l.mu.Unlock()
	select {
	case l.added <- struct{}{}:
	default:
	}
	return len(p), nil
}

// waitFor waits until a line after offset contains want, and returns the
// offset after it.
func (l *lines) waitFor(t *testing.T, offset int, want string) int {
	t.Helper()
	deadline := time.After(60 * time.Second)
	for {
		l.mu.Lock()
		s := l.text.String()
		l.mu.Unlock()
		if i := strings.Index(s[offset:], want); i >= 0 {
			return offset + i + len(want)
		}
		select {
		case <-l.added:
		case <-deadline:
			t.Fatalf("no %q in the demo's output:\n%s", want, s)
		}
	}
}

func copyFile(t *testing.T, from, to string, replace ...string) {
	t.Helper()
	b, err := os.ReadFile(from)
	if err != nil {
		t.Fatal(err)
	}
	s := strings.NewReplacer(replace...).Replace(string(b))
	if err := os.WriteFile(to, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestDemo runs the demo on the example mesh (on a free port): calls
// succeed over mTLS with certificates from real agents, an edit of the
// policy file is pushed and turns them into PermissionDenied and back, and cancelling
// stops everything cleanly.
func TestDemo(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := fmt.Sprint(l.Addr().(*net.TCPAddr).Port)
	l.Close()
	meshDir, polDir := t.TempDir(), t.TempDir()
	copyFile(t, "../examples/mesh/demo.yaml", filepath.Join(meshDir, "demo.yaml"), "17070", port)
	policy := filepath.Join(polDir, "echo.yaml")
	copyFile(t, "../examples/mesh/policies/echo.yaml", policy)

	out := &lines{added: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- demo.Run(ctx, demo.Config{MeshDir: meshDir, PoliciesDir: polDir, WorkDir: t.TempDir(), Interval: 100 * time.Millisecond, Out: out})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run() = %v", err)
		}
	}()
	at := out.waitFor(t, 0, "OK over mTLS")
	copyFile(t, policy, policy, "sa/client\"", "sa/someone-else\"")
	out.waitFor(t, at, "xDS push")
	at = out.waitFor(t, at, "PermissionDenied")
	copyFile(t, policy, policy, "sa/someone-else\"", "sa/client\"")
	out.waitFor(t, at, "OK over mTLS")
}
