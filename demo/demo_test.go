package demo_test

import (
	"context"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"testing/fstest"
	"time"

	"github.com/trustmesh/trustmesh/demo"
	"github.com/trustmesh/trustmesh/examples"
	"github.com/trustmesh/trustmesh/internal/freeport"
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

// records keeps the log records at or above level.
type records struct {
	level slog.Level
	mu    sync.Mutex
	recs  []slog.Record
}

func (r *records) Enabled(_ context.Context, l slog.Level) bool { return l >= r.level }
func (r *records) Handle(_ context.Context, rec slog.Record) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.recs = append(r.recs, rec)
	return nil
}
func (r *records) WithAttrs([]slog.Attr) slog.Handler { return r }
func (r *records) WithGroup(string) slog.Handler      { return r }

// take returns the records kept so far, and forgets them.
func (r *records) take() []slog.Record {
	r.mu.Lock()
	defer r.mu.Unlock()
	out := r.recs
	r.recs = nil
	return out
}

// lineAt returns the line of the output that holds offset.
func (l *lines) lineAt(offset int) string {
	l.mu.Lock()
	s := l.text.String()
	l.mu.Unlock()
	start := strings.LastIndexByte(s[:offset], '\n') + 1
	end := strings.IndexByte(s[offset:], '\n')
	if end < 0 {
		return s[start:]
	}
	return s[start : offset+end]
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
// policy file is pushed and turns them into PermissionDenied and back, an
// edit that does not parse is refused and the demo says so, and
// cancelling stops everything cleanly.
func TestDemo(t *testing.T) {
	port := freeport.Port(t)
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
	at = out.waitFor(t, at, "OK over mTLS")

	// An edit that does not parse: the demo names the file and the
	// version it keeps enforcing, and calls go on succeeding.
	good, err := os.ReadFile(policy)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(policy, append(good, "  notAField: 1\n"...), 0o600); err != nil {
		t.Fatal(err)
	}
	at = out.waitFor(t, at, "policy refused: ")
	line := out.lineAt(at)
	if !strings.Contains(line, policy) || !strings.Contains(line, "(still enforcing version 3)") {
		t.Errorf("refusal line %q does not name %s and the version still enforced, 3", line, policy)
	}
	at = out.waitFor(t, at, "OK over mTLS")
	if err := os.WriteFile(policy, good, 0o600); err != nil {
		t.Fatal(err)
	}
	out.waitFor(t, at, "OK over mTLS")
}

// TestDemoRunsAnywhere runs the demo as a newcomer does, with no flags and
// from a directory that is not the repository: it runs on its built-in
// mesh, copied to its work directory, names the policy file to edit there,
// and starts without an error in its log or in grpc-go's. The built-in
// mesh is given the echo port of a free port, as other tests run the demo
// at the same time.
func TestDemoRunsAnywhere(t *testing.T) {
	t.Chdir(t.TempDir())
	work := t.TempDir()
	mesh := fstest.MapFS{}
	err := fs.WalkDir(examples.Mesh(), ".", func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		b, err := fs.ReadFile(examples.Mesh(), path)
		if path == "demo.yaml" {
			b = []byte(strings.ReplaceAll(string(b), "17070", freeport.Port(t)))
		}
		mesh[path] = &fstest.MapFile{Data: b, Mode: 0o644}
		return err
	})
	if err != nil || mesh["policies/echo.yaml"] == nil {
		t.Fatalf("the embedded mesh: %v; it has %d files", err, len(mesh))
	}
	logs := &records{level: slog.LevelWarn}
	grpcLogs.take()

	out := &lines{added: make(chan struct{}, 1)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- demo.Run(ctx, demo.Config{WorkDir: work, Mesh: mesh, Interval: 100 * time.Millisecond, Out: out, Log: slog.New(logs)})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run() = %v", err)
		}
	}()
	policy := filepath.Join(work, "mesh", "policies", "echo.yaml")
	out.waitFor(t, 0, "Edit "+policy+" to change who may call")
	out.waitFor(t, 0, "OK over mTLS")
	for name, rs := range map[string][]slog.Record{"the demo": logs.take(), "grpc-go": grpcLogs.take()} {
		for _, r := range rs {
			if r.Level >= slog.LevelError {
				t.Errorf("%s logged at %v on a healthy start: %s", name, r.Level, r.Message)
			}
		}
	}
}
