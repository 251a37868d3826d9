// Package rotation injects faults into CA rotation of the real trustmesh
// binary: a forced rotation (`ca rotate --taint`) under mTLS traffic between
// real agents, and SIGKILL of `trustmesh serve` during a rotation step.
package rotation

import (
	"bytes"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/internal/binary"
)

var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "faults-rotation-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if bin, err = binary.BuildTrustmesh(dir, "FAULTS_TRUSTMESH"); err != nil {
		os.RemoveAll(dir)
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

// lockedBuffer is a process's stderr, read while the process writes it.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

// proc is a running trustmesh process.
type proc struct {
	name   string
	cmd    *exec.Cmd
	stderr *lockedBuffer
	done   chan struct{}
	err    error
}

// start runs trustmesh with args; cleanup kills it and, if the test failed,
// logs what it wrote.
func start(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, cmd: exec.Command(bin, args...), stderr: &lockedBuffer{}, done: make(chan struct{})}
	p.cmd.Stdout, p.cmd.Stderr = p.stderr, p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.err = p.cmd.Wait(); close(p.done) }()
	t.Cleanup(func() {
		p.kill()
		if t.Failed() {
			t.Logf("%s output:\n%s", name, p.stderr.String())
		}
	})
	return p
}

// kill sends SIGKILL and waits for the process to go.
func (p *proc) kill() {
	select {
	case <-p.done:
		return
	default:
	}
	_ = p.cmd.Process.Kill()
	<-p.done
}

func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// cli runs a trustmesh command to completion and returns its stdout.
func cli(t *testing.T, args ...string) string {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("trustmesh %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.String()
}

// eventually polls cond every 50 ms until it holds or within passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// serve is a running `trustmesh serve` on a data directory of its own.
type serve struct {
	*proc
	dataDir string
	caAddr  string
	args    []string
}

// startServe runs serve on dataDir, checking its rotation state every
// second, and waits for its CA port.
func startServe(t *testing.T, dataDir string, extra ...string) *serve {
	t.Helper()
	s := &serve{dataDir: dataDir, caAddr: freeport.Addr(t)}
	s.args = append([]string{"serve", "--data-dir", dataDir, "--kubernetes", "off",
		"--listen-ca", s.caAddr, "--listen-monitoring", freeport.Addr(t), "--listen-bundle", "", "--listen-ui", "off",
		"--listen-authz", "off", "--listen-injector", "off", "--ca-rotation-interval", "1s"}, extra...)
	s.restart(t)
	return s
}

// restart starts serve again with the same arguments, after kill.
func (s *serve) restart(t *testing.T) {
	t.Helper()
	s.proc = start(t, "serve", s.args...)
	p := s.proc
	eventually(t, 60*time.Second, "serve's CA port", func() bool {
		if p.exited() {
			t.Fatalf("serve exited: %v\n%s", p.err, p.stderr.String())
		}
		c, err := net.Dial("tcp", s.caAddr)
		if err == nil {
			c.Close()
		}
		_, serr := os.Stat(filepath.Join(s.dataDir, "ca", "rotation.json"))
		return err == nil && serr == nil
	})
}

// bundleFile writes the CA's roots to a file in dir.
func (s *serve) bundleFile(t *testing.T, dir string) string {
	t.Helper()
	f := filepath.Join(dir, "ca-bundle.pem")
	if err := os.WriteFile(f, []byte(cli(t, "ca", "bundle", "--data-dir", s.dataDir)), 0o600); err != nil {
		t.Fatal(err)
	}
	return f
}

func tempDir(t *testing.T, prefix string) string {
	t.Helper()
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// matchLine reports whether a line of text matches the regular expression.
func matchLine(text, expr string) bool {
	re := regexp.MustCompile(expr)
	for _, l := range strings.Split(text, "\n") {
		if re.MatchString(l) {
			return true
		}
	}
	return false
}
