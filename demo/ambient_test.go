package demo_test

import (
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/demo"
)

// TestAmbient runs `trustmesh demo --ambient` as its command does: calls
// through the node proxy succeed; a DENY written to the policy file it
// names refuses them (so the calls did go through the proxy, which asks the
// policy); ALLOW again lets them through; and at the end no namespace of
// the demo is left.
func TestAmbient(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("demo --ambient runs on Linux only")
	}
	if os.Geteuid() != 0 {
		t.Skip("demo --ambient creates network namespaces and iptables rules, which needs root (make test runs as root)")
	}
	for _, tool := range []string{"ip", "iptables-restore", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is missing (hack/debian-tools.sh installs it): %v", tool, err)
		}
	}
	out := &lines{added: make(chan struct{}, 1)}
	work := t.TempDir()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- demo.RunAmbient(ctx, demo.AmbientConfig{WorkDir: work, Interval: 200 * time.Millisecond, Out: out})
	}()
	// A failed test too waits for the demo to remove its namespaces.
	stopped := false
	t.Cleanup(func() {
		if !stopped {
			cancel()
			select {
			case <-done:
			case <-time.After(30 * time.Second):
			}
		}
	})

	off := out.waitFor(t, 0, "the node proxy captures demo/client-0")
	off = out.waitFor(t, 0, "the node proxy captures demo/server-0")
	off = out.waitFor(t, off, "OK through the node proxy (HBONE, mTLS, authorized): server-0 echoes call")
	policy := filepath.Join(work, "policies", "server.yaml")
	out.waitFor(t, 0, "edit "+policy+" (change ALLOW to DENY)")

	writeFile(t, policy, demo.AmbientPolicy("DENY"))
	off = out.waitFor(t, off, ": refused: ")
	writeFile(t, policy, demo.AmbientPolicy("ALLOW"))
	out.waitFor(t, off, "OK through the node proxy")

	cancel()
	stopped = true
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("RunAmbient at cancel: %v", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("RunAmbient did not return within 30s of its context's end")
	}
	out.mu.Lock()
	text := out.text.String()
	out.mu.Unlock()
	m := regexp.MustCompile(`network namespace (tmdemo\d+)-node`).FindStringSubmatch(text)
	if m == nil {
		t.Fatalf("the demo did not name its namespaces:\n%s", text)
	}
	list, err := exec.Command("ip", "netns", "list").CombinedOutput()
	if err != nil {
		t.Fatalf("ip netns list: %v: %s", err, list)
	}
	if strings.Contains(string(list), m[1]+"-") {
		t.Fatalf("namespaces of the demo left after it ended:\n%s", list)
	}
}

// TestAmbientNeedsRoot: as anyone else, RunAmbient refuses at once with
// ErrNeedsRoot (the command exits 2), making nothing.
func TestAmbientNeedsRoot(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("demo --ambient runs on Linux only")
	}
	if os.Geteuid() == 0 {
		t.Skip("runs as root: the refusal is for anyone else")
	}
	err := demo.RunAmbient(context.Background(), demo.AmbientConfig{WorkDir: t.TempDir()})
	if !errors.Is(err, demo.ErrNeedsRoot) {
		t.Fatalf("RunAmbient as uid %d: %v, want ErrNeedsRoot", os.Geteuid(), err)
	}
}

// writeFile replaces path atomically, as the policy watcher expects of an
// editor.
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
