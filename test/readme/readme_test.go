// Package readme runs the commands that the READMEs show, verbatim, the
// way a new user would type them: every command in a ```sh block, in
// order, from the top of the repository, with `trustmesh` on PATH after
// `make build`. A command the README shows must work as written.
package readme

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// readmes are the files whose commands run, in this order, from one fresh
// copy of the repository's top level, as one user's shell would.
var readmes = []string{"README.md", "examples/mesh/README.md", "examples/policies/README.md"}

// command is one line of a ```sh block, continuation lines joined and
// trailing comments dropped.
type command struct {
	file string
	line int
	text string
}

// commands extracts the commands of a README's ```sh blocks.
func commands(t *testing.T, file string, src []byte) []command {
	t.Helper()
	var out []command
	in := false
	var cur strings.Builder
	start := 0
	sc := bufio.NewScanner(bytes.NewReader(src))
	for n := 1; sc.Scan(); n++ {
		l := sc.Text()
		trimmed := strings.TrimSpace(l)
		switch {
		case !in && (trimmed == "```sh" || trimmed == "```bash" || trimmed == "```shell"):
			in = true
			continue
		case in && trimmed == "```":
			in = false
			continue
		case !in:
			continue
		}
		if cur.Len() == 0 {
			start = n
		}
		if s, ok := strings.CutSuffix(l, `\`); ok {
			cur.WriteString(s)
			continue
		}
		cur.WriteString(l)
		text := stripComment(cur.String())
		cur.Reset()
		if text != "" {
			out = append(out, command{file: file, line: start, text: text})
		}
	}
	if in {
		t.Fatalf("%s: a ```sh block is not closed", file)
	}
	return out
}

// stripComment drops a trailing "# ..." that is outside quotes, and
// surrounding space.
func stripComment(s string) string {
	var quote rune
	for i, r := range s {
		switch {
		case quote != 0:
			if r == quote {
				quote = 0
			}
		case r == '\'' || r == '"':
			quote = r
		case r == '#' && (i == 0 || s[i-1] == ' ' || s[i-1] == '\t'):
			return strings.TrimSpace(s[:i])
		}
	}
	return strings.TrimSpace(s)
}

// expect is what the output of a command must show, beyond its exit code,
// by the start of the command: a command can exit 0 and still not do what
// the README says it does (a policy check that denies, an audit log
// without the workload). Every entry must match a command.
var expect = []struct {
	prefix string
	want   []string
}{
	{"trustmesh policy check", []string{`"allowed": true`, `"policy": "bookinfo/productpage-viewer"`}},
	{"trustmesh policy explain", []string{"DENY bookinfo/deny-admin: matched rule 0", "denied (403)"}},
	{"trustmesh policy who-can", []string{"conditional", "demo/echo-callers"}},
	{"curl -s http://127.0.0.1:15018/ui/api/access", []string{`"verdict":"conditional"`, `"policy":"demo/echo-callers"`}},
	{"trustmesh analyze", []string{"0 error(s), 0 warning(s)"}},
	{"trustmesh xds dump", []string{"policy_digest", "echo"}},
	{"openssl x509", []string{"URI:spiffe://cluster.local/vm/db"}},
	{"trustmesh check", []string{"TM-CA-", "TM-CP-001"}},
	{"trustmesh audit log", []string{"spiffe://cluster.local/vm/db"}},
	{"trustmesh audit verify", []string{"OK: the journal matches every checkpoint"}},
	{"trustmesh audit check-proof", []string{"OK: entry"}},
}

// assignment is a line that sets a shell variable for the lines after it.
var assignment = regexp.MustCompile(`^(?:export\s+)?([A-Za-z_][A-Za-z0-9_]*)=`)

// longRunning says how to tell that a command that runs until it is
// stopped is up, or nil for a command that runs to completion.
func longRunning(text string) func(out *bytes.Buffer) bool {
	f := strings.Fields(text)
	if len(f) < 2 || f[0] != "trustmesh" {
		return nil
	}
	get := func(url string) bool {
		r, err := http.Get(url)
		if err != nil {
			return false
		}
		r.Body.Close()
		return r.StatusCode == http.StatusOK
	}
	switch f[1] {
	case "agent":
		// Healthy once it holds a certificate.
		return func(*bytes.Buffer) bool { return get("http://127.0.0.1:15024/healthz") }
	case "serve":
		if strings.Contains(text, "--validate") {
			return nil
		}
		return func(*bytes.Buffer) bool { return get("http://127.0.0.1:15014/readyz") }
	case "demo":
		ok := regexp.MustCompile(`call \d+: OK`)
		return func(out *bytes.Buffer) bool { return ok.Match(out.Bytes()) }
	}
	return nil
}

func TestREADMECommandsWorkVerbatim(t *testing.T) {
	if testing.Short() {
		t.Skip("runs make build and the README's commands")
	}
	root, err := filepath.Abs("../..")
	if err != nil {
		t.Fatal(err)
	}
	// What one README sets (PATH, after make build) holds for the next,
	// as it would in a user's shell.
	env := map[string]string{}
	matched := map[string]bool{}
	t.Cleanup(func() {
		if t.Failed() {
			return
		}
		for _, e := range expect {
			if !matched[e.prefix] {
				t.Errorf("no README command starts with %q any more: update expect", e.prefix)
			}
		}
	})
	dir := sandbox(t, root)
	for _, file := range readmes {
		src, err := os.ReadFile(filepath.Join(root, file))
		if err != nil {
			t.Fatal(err)
		}
		cmds := commands(t, file, src)
		if len(cmds) == 0 {
			continue
		}
		if !t.Run(file, func(t *testing.T) { run(t, root, dir, env, matched, cmds) }) {
			return
		}
	}
}

// sandbox is a fresh directory that looks like the top of the repository
// (each entry a link to the real one) but where the commands' own output,
// such as trustmesh-data, lands.
func sandbox(t *testing.T, root string) string {
	t.Helper()
	dir := t.TempDir()
	entries, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if e.Name() == "trustmesh-data" || e.Name() == ".git" {
			continue
		}
		if err := os.Symlink(filepath.Join(root, e.Name()), filepath.Join(dir, e.Name())); err != nil {
			t.Fatal(err)
		}
	}
	// bin/ is where make build writes; link it even before it exists.
	if _, err := os.Lstat(filepath.Join(dir, "bin")); err != nil {
		if err := os.Symlink(filepath.Join(root, "bin"), filepath.Join(dir, "bin")); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func run(t *testing.T, root, dir string, env map[string]string, matched map[string]bool, cmds []command) {
	// Commands the README starts in the background (a trailing &) run
	// until a `kill %…` line, or the end of the file, which stop them as
	// the shell would, last first.
	var jobs []func(syscall.Signal)
	stopJobs := func(sig syscall.Signal) {
		for i := len(jobs) - 1; i >= 0; i-- {
			jobs[i](sig)
		}
		jobs = nil
	}
	defer stopJobs(syscall.SIGINT)
	for _, c := range cmds {
		name := fmt.Sprintf("%s:%d: %s", c.file, c.line, c.text)
		if c.text == "make test" {
			t.Logf("%s: skipped, it is what runs this test", name)
			continue
		}
		if strings.HasPrefix(c.text, "kill %") {
			if len(jobs) == 0 {
				t.Fatalf("%s: no background job to stop", name)
			}
			stopJobs(syscall.SIGTERM)
			continue
		}
		cwd := dir
		if strings.HasPrefix(c.text, "make ") {
			// make runs in the real repository, as a user's would.
			cwd = root
		}
		script, bg := c.text, false
		if s, ok := strings.CutSuffix(c.text, "&"); ok && !strings.HasSuffix(s, "&") {
			script, bg = strings.TrimSpace(s), true
		}
		var varName string
		if m := assignment.FindStringSubmatch(c.text); m != nil {
			varName = m[1]
			script += "\nprintf '%s' \"$" + varName + "\""
		}
		timeout := 3 * time.Minute
		if strings.HasPrefix(c.text, "make ") {
			timeout = 20 * time.Minute
		}
		ctx, cancel := context.WithTimeout(context.Background(), timeout)
		cmd := exec.CommandContext(ctx, "bash", "-euo", "pipefail", "-c", script)
		cmd.Dir = cwd
		cmd.Env = os.Environ()
		for k, v := range env {
			cmd.Env = append(cmd.Env, k+"="+v)
		}
		var out bytes.Buffer
		cmd.Stdout, cmd.Stderr = &out, &out
		cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
		ready := longRunning(script)
		if bg {
			stop := background(t, name, cmd, nil)
			jobs = append(jobs, func(sig syscall.Signal) { stop(sig); cancel() })
			continue
		}
		if ready == nil {
			err := cmd.Run()
			cancel()
			if err != nil {
				t.Fatalf("%s\nfailed: %v\n%s", name, err, out.String())
			}
			if varName != "" {
				env[varName] = out.String()
			}
			for _, e := range expect {
				if !strings.HasPrefix(c.text, e.prefix) {
					continue
				}
				matched[e.prefix] = true
				for _, w := range e.want {
					if !strings.Contains(out.String(), w) {
						t.Fatalf("%s\nexited 0, but its output lacks %q:\n%s", name, w, out.String())
					}
				}
			}
			t.Logf("%s: ok", name)
			continue
		}
		background(t, name, cmd, ready)(syscall.SIGINT)
		cancel()
	}
}

// logBuffer collects a process's output while it runs.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *logBuffer) snapshot() *bytes.Buffer {
	b.mu.Lock()
	defer b.mu.Unlock()
	return bytes.NewBuffer(append([]byte(nil), b.buf.Bytes()...))
}

// background starts a command that runs until it is stopped and returns a
// function that stops it with a signal (SIGINT as Ctrl-C sends it, SIGTERM
// as kill does) and checks that it was still running and then stopped
// cleanly. With ready, it first waits until the command is up, as a user
// watching it would before going on; a command the README starts with &
// gets no such wait, since a shell gives it none.
func background(t *testing.T, name string, cmd *exec.Cmd, ready func(*bytes.Buffer) bool) func(syscall.Signal) {
	t.Helper()
	out := &logBuffer{}
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Start(); err != nil {
		t.Fatalf("%s: %v", name, err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	if ready != nil {
		deadline := time.After(2 * time.Minute)
		for up := false; !up; {
			select {
			case err := <-done:
				t.Fatalf("%s\nexited before it was up: %v\n%s", name, err, out.snapshot())
			case <-deadline:
				_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
				t.Fatalf("%s\nnot up within 2 minutes:\n%s", name, out.snapshot())
			case <-time.After(100 * time.Millisecond):
				up = ready(out.snapshot())
			}
		}
		t.Logf("%s: up", name)
	} else {
		t.Logf("%s: started", name)
	}
	return func(sig syscall.Signal) {
		t.Helper()
		select {
		case err := <-done:
			t.Fatalf("%s\nexited (%v) before it was stopped:\n%s", name, err, out.snapshot())
		default:
		}
		_ = syscall.Kill(-cmd.Process.Pid, sig)
		select {
		case err := <-done:
			if err != nil {
				t.Fatalf("%s\ndid not stop cleanly on %v: %v\n%s", name, sig, err, out.snapshot())
			}
			t.Logf("%s: stopped on %v", name, sig)
		case <-time.After(30 * time.Second):
			_ = syscall.Kill(-cmd.Process.Pid, syscall.SIGKILL)
			t.Fatalf("%s\ndid not stop within 30s of %v:\n%s", name, sig, out.snapshot())
		}
	}
}
