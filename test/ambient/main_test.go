// Package ambient tests the node agent of ambient mode end to end, with
// real processes as a node runs them: `trustmesh serve` with mesh files
// that declare a Node, `trustmesh node` holding that node's identities, and
// processes standing in for pods, each in a network namespace and a cgroup
// of its own and under a user of its own, fetching their SVIDs through the
// node's one socket with the unchanged go-spiffe client (./workload).
//
// It creates network namespaces and cgroups, and switches users, so it runs
// as root (make test does); as anyone else every test skips and says why.
package ambient

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
	"github.com/trustmesh/trustmesh/test/internal/binary"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

var (
	// bin is the trustmesh binary, workloadBin the stand-in for a pod's
	// program; both built once by TestMain into a directory every user
	// may read and execute.
	bin, workloadBin string
	// skipReason is why the tests cannot run here; "" when they can.
	skipReason string
)

func TestMain(m *testing.M) { os.Exit(run(m)) }

func run(m *testing.M) int {
	if os.Geteuid() != 0 {
		skipReason = "the ambient tests create network namespaces and cgroups and run processes as other users, which needs root (make test runs them as root)"
		return m.Run()
	}
	for _, tool := range []string{"unshare", "nsenter", "umount"} {
		if _, err := exec.LookPath(tool); err != nil {
			fmt.Fprintf(os.Stderr, "ambient: %s (util-linux) is missing: %v\n", tool, err)
			return 1
		}
	}
	dir, err := os.MkdirTemp("", "trustmesh-ambient-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	// The workloads run as other users: they must reach their program.
	if err := os.Chmod(dir, 0o755); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	if bin, err = binary.BuildTrustmesh(dir, "AMBIENT_TRUSTMESH"); err != nil {
		fmt.Fprintln(os.Stderr, "ambient:", err)
		return 1
	}
	if workloadBin, err = binary.Build(dir, "github.com/trustmesh/trustmesh/test/ambient/workload"); err != nil {
		fmt.Fprintln(os.Stderr, "ambient:", err)
		return 1
	}
	code := m.Run()
	if code != 0 {
		return code
	}
	return leakcheck.CheckOurs(os.Stderr)
}

func needRoot(t *testing.T) {
	t.Helper()
	if skipReason != "" {
		t.Skip(skipReason)
	}
}

// shortDir is a temporary directory with a short name, readable by every
// user: unix socket paths are limited to 108 bytes, and the workloads run
// as other users.
func shortDir(t *testing.T) string {
	t.Helper()
	dir, err := os.MkdirTemp("", "tm-amb")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return dir
}

// proc is a trustmesh process the test started, with its log.
type proc struct {
	name   string
	cmd    *exec.Cmd
	exited chan struct{}

	mu  sync.Mutex
	log []string // the last lines of stderr
	// watch, when set, is called with each log line until it returns true.
	watch func(string) bool
}

func startProc(t *testing.T, name string, watch func(string) bool, args ...string) *proc {
	t.Helper()
	p := &proc{name: name, exited: make(chan struct{}), watch: watch}
	p.cmd = exec.Command(bin, args...)
	pr, pw := io.Pipe()
	p.cmd.Stderr = pw
	p.cmd.Stdout = pw
	if err := p.cmd.Start(); err != nil {
		t.Fatalf("starting %s: %v", name, err)
	}
	logDone := make(chan struct{})
	go func() { p.readLog(pr); close(logDone) }()
	go func() { _ = p.cmd.Wait(); pw.Close(); <-logDone; close(p.exited) }()
	t.Cleanup(func() {
		p.stop(syscall.SIGTERM)
		if t.Failed() {
			t.Logf("%s log:\n%s", name, p.lastLog())
		}
	})
	return p
}

func (p *proc) readLog(r io.Reader) {
	sc := bufio.NewScanner(r)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		p.mu.Lock()
		p.log = append(p.log, line)
		if len(p.log) > 300 {
			p.log = p.log[len(p.log)-300:]
		}
		w := p.watch
		p.mu.Unlock()
		if w != nil && w(line) {
			p.mu.Lock()
			p.watch = nil
			p.mu.Unlock()
		}
	}
}

func (p *proc) lastLog() string {
	p.mu.Lock()
	defer p.mu.Unlock()
	return strings.Join(p.log, "\n")
}

func (p *proc) running() bool {
	select {
	case <-p.exited:
		return false
	default:
		return true
	}
}

// stop sends sig (SIGKILL: a crash) and waits for the exit; after a
// SIGTERM that is not obeyed within 10 s, it kills.
func (p *proc) stop(sig syscall.Signal) {
	if !p.running() {
		return
	}
	_ = p.cmd.Process.Signal(sig)
	select {
	case <-p.exited:
	case <-time.After(10 * time.Second):
		_ = p.cmd.Process.Kill()
		<-p.exited
	}
}

// server is a running `trustmesh serve` with Kubernetes off.
type server struct {
	*proc
	dataDir, meshDir string
	// ca and monitoring are host:port on loopback.
	ca, monitoring string
	// bundleFile is the trust bundle (PEM), for the node's --ca-bundle-file.
	bundleFile string
}

// startServe runs `trustmesh serve` on loopback ports, off Kubernetes
// unless extra says otherwise, with the mesh files given (file name →
// content; nil: no --mesh), and waits until it is ready.
func startServe(t *testing.T, mesh map[string]string, extra ...string) *server {
	t.Helper()
	dir := shortDir(t)
	s := &server{dataDir: filepath.Join(dir, "data"), meshDir: filepath.Join(dir, "mesh")}
	args := []string{"serve", "--data-dir", s.dataDir, "--kubernetes", "off", "--log-format", "json",
		"--listen-ca", "127.0.0.1:0", "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "",
		"--listen-authz", "off", "--listen-ui", "off"}
	if mesh != nil {
		if err := os.Mkdir(s.meshDir, 0o755); err != nil {
			t.Fatal(err)
		}
		for name, content := range mesh {
			if err := os.WriteFile(filepath.Join(s.meshDir, name), []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		args = append(args, "--mesh", s.meshDir)
	}
	// A flag given again in extra wins: the last one counts.
	args = append(args, extra...)
	addrs := make(chan map[string]any, 1)
	s.proc = startProc(t, "trustmesh serve", func(line string) bool {
		var rec map[string]any
		if json.Unmarshal([]byte(line), &rec) == nil && rec["msg"] == "trustmesh control plane serving" {
			addrs <- rec
			return true
		}
		return false
	}, args...)
	select {
	case a := <-addrs:
		s.ca, _ = a["ca"].(string)
		s.monitoring, _ = a["monitoring"].(string)
	case <-s.exited:
		t.Fatalf("trustmesh serve exited at start:\n%s", s.lastLog())
	case <-time.After(90 * time.Second):
		t.Fatalf("trustmesh serve did not say where it serves within 90s:\n%s", s.lastLog())
	}
	waitHTTP(t, "http://"+s.monitoring+"/readyz", 60*time.Second, s.proc)
	s.bundleFile = filepath.Join(dir, "bundle.pem")
	if err := os.WriteFile(s.bundleFile, s.cli(t, "ca", "bundle", "--data-dir", s.dataDir), 0o644); err != nil {
		t.Fatal(err)
	}
	return s
}

// cli runs a trustmesh command and returns its stdout.
func (s *server) cli(t *testing.T, args ...string) []byte {
	t.Helper()
	cmd := exec.Command(bin, args...)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("trustmesh %s: %v\n%s", strings.Join(args, " "), err, stderr.String())
	}
	return out
}

// writeMesh replaces one mesh file; the server reads the directory again.
func (s *server) writeMesh(t *testing.T, name, content string) {
	t.Helper()
	tmp := filepath.Join(s.meshDir, "."+name+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(tmp, filepath.Join(s.meshDir, name)); err != nil {
		t.Fatal(err)
	}
}

// waitHTTP waits until url answers 200.
func waitHTTP(t *testing.T, url string, d time.Duration, p *proc) {
	t.Helper()
	c := &http.Client{Timeout: 5 * time.Second, Transport: &http.Transport{DisableKeepAlives: true}}
	deadline := time.Now().Add(d)
	for {
		resp, err := c.Get(url)
		if err == nil {
			_, _ = io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		if !p.running() {
			t.Fatalf("%s exited:\n%s", p.name, p.lastLog())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s not 200 after %s (%v)", url, d, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// nodeAgent is a running `trustmesh node`.
type nodeAgent struct {
	*proc
	name                        string
	socket, stateDir, tokenFile string
	monitoring                  string
}

// joinNode makes a node join token for name and returns the flags for a
// `trustmesh node` on a fresh state directory and socket.
func joinNode(t *testing.T, s *server, name string) *nodeAgent {
	t.Helper()
	dir := shortDir(t)
	n := &nodeAgent{name: name, socket: filepath.Join(dir, "node.sock"), stateDir: filepath.Join(dir, "state"), tokenFile: filepath.Join(dir, "node.token")}
	tok := s.cli(t, "ca", "token", "create", "--data-dir", s.dataDir, "--node", name, "--ttl", "10m")
	if err := os.WriteFile(n.tokenFile, tok, 0o600); err != nil {
		t.Fatal(err)
	}
	return n
}

// start runs `trustmesh node` (again, after a stop: same state directory,
// same flags, as a service manager would restart it).
func (n *nodeAgent) start(t *testing.T, s *server, extra ...string) {
	t.Helper()
	n.monitoring = freeport.Addr(t)
	args := append([]string{"node", "--node-name", n.name,
		"--ca-address", s.ca, "--ca-bundle-file", s.bundleFile, "--join-token-file", n.tokenFile,
		"--state-dir", n.stateDir, "--socket", n.socket, "--monitoring-address", n.monitoring,
		"--pending-wait", "2s", "--sync-interval", "1s"}, extra...)
	n.proc = startProc(t, "trustmesh node "+n.name, nil, args...)
}

// pod stands in for a pod: a network namespace, a cgroup and a user of its
// own. Each fetch is a new process that joins all three before it runs the
// workload program.
type pod struct {
	name     string
	netns    string // the name under /run/netns
	cgroup   string // the cgroup directory (in one hierarchy)
	uid, gid int
}

// netnsDir is where named network namespaces live, as `ip netns` keeps them.
const netnsDir = "/run/netns"

// newPod creates the pod's network namespace (named, under /run/netns, as
// `ip netns add` makes it) and its cgroup; cleanup removes both.
func newPod(t *testing.T, name string, uid, gid int) *pod {
	t.Helper()
	return newPodIn(t, name, uid, gid, fmt.Sprintf("%d-%s", os.Getpid(), name))
}

// newPodIn is newPod with the cgroup at rel (a relative path) under the
// test's own cgroup, such as a kubelet's kubepods/…/pod<UID>/<container>.
func newPodIn(t *testing.T, name string, uid, gid int, rel string) *pod {
	t.Helper()
	p := &pod{name: name, netns: fmt.Sprintf("tm-amb-%d-%s", os.Getpid(), name), uid: uid, gid: gid}
	if err := os.MkdirAll(netnsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	nsFile := filepath.Join(netnsDir, p.netns)
	if err := os.WriteFile(nsFile, nil, 0o444); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("unshare", "--net="+nsFile, "true").CombinedOutput(); err != nil {
		os.Remove(nsFile)
		t.Fatalf("creating network namespace %s: %v\n%s", p.netns, err, out)
	}
	t.Cleanup(func() {
		_ = exec.Command("umount", nsFile).Run()
		os.Remove(nsFile)
	})
	root, err := cgroupRoot()
	if err != nil {
		t.Fatal(err)
	}
	top := filepath.Join(root, "trustmesh-ambient-test")
	p.cgroup = filepath.Join(top, rel)
	if err := os.MkdirAll(p.cgroup, 0o755); err != nil {
		t.Fatalf("creating cgroup %s: %v", p.cgroup, err)
	}
	t.Cleanup(func() {
		// The workloads have exited; an empty cgroup is removed with
		// rmdir, leaf first; a parent still in use by another pod stays.
		for i := 0; i < 50 && os.Remove(p.cgroup) != nil; i++ {
			time.Sleep(100 * time.Millisecond)
		}
		for dir := filepath.Dir(p.cgroup); strings.HasPrefix(dir, top); dir = filepath.Dir(dir) {
			if os.Remove(dir) != nil {
				break
			}
		}
	})
	return p
}

// cgroupRoot is where the test makes its cgroups: the unified hierarchy
// under cgroup v2, else the pids hierarchy of cgroup v1.
func cgroupRoot() (string, error) {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return "/sys/fs/cgroup", nil
	}
	for _, h := range []string{"/sys/fs/cgroup/pids", "/sys/fs/cgroup/systemd", "/sys/fs/cgroup/memory"} {
		if _, err := os.Stat(filepath.Join(h, "cgroup.procs")); err == nil {
			return h, nil
		}
	}
	return "", errors.New("no cgroup v2 hierarchy and no cgroup v1 pids, systemd or memory hierarchy under /sys/fs/cgroup")
}

// result is what the workload program printed.
type result struct {
	PID     int      `json:"pid"`
	IDs     []string `json:"ids"`
	Bundles []string `json:"bundles"`
	Serials []string `json:"serials"`
	Cgroup  string   `json:"cgroup"`
	Netns   string   `json:"netns"`
	UID     int      `json:"uid"`
	Code    string   `json:"code"`
	Error   string   `json:"error"`
}

// fetch runs the workload program in the pod: a shell as root moves itself
// into the cgroup, then nsenter enters the network namespace and drops to
// the pod's user, and execs the program, which keeps the PID throughout.
func (p *pod) fetch(ctx context.Context, socket string) (result, error) {
	script := fmt.Sprintf(`echo $$ > %s/cgroup.procs && exec nsenter --net=%s -S %d -G %d -- %s -socket %s -timeout 15s`,
		p.cgroup, filepath.Join(netnsDir, p.netns), p.uid, p.gid, workloadBin, socket)
	cmd := exec.CommandContext(ctx, "sh", "-c", script)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return result{}, fmt.Errorf("pod %s: %w\n%s", p.name, err, stderr.String())
	}
	var r result
	if err := json.Unmarshal(out, &r); err != nil {
		return result{}, fmt.Errorf("pod %s printed %q: %w", p.name, out, err)
	}
	if !strings.Contains(r.Cgroup, filepath.Base(p.cgroup)) || r.UID != p.uid || r.Netns == "" {
		return r, fmt.Errorf("pod %s's process did not run as set up: uid %d, cgroup %q, netns %q", p.name, r.UID, r.Cgroup, r.Netns)
	}
	return r, nil
}

// watch runs the workload program in the pod as fetch does, watching the
// stream until it has seen updates updates (or a refusal, or timeout),
// and returns a result per line.
func (p *pod) watch(ctx context.Context, socket string, updates int, timeout time.Duration) ([]result, error) {
	script := fmt.Sprintf(`echo $$ > %s/cgroup.procs && exec nsenter --net=%s -S %d -G %d -- %s -socket %s -updates %d -timeout %s`,
		p.cgroup, filepath.Join(netnsDir, p.netns), p.uid, p.gid, workloadBin, socket, updates, timeout)
	cmd := exec.CommandContext(ctx, "sh", "-c", script)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("pod %s: %w\n%s", p.name, err, stderr.String())
	}
	var rs []result
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		var r result
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			return nil, fmt.Errorf("pod %s printed %q: %w", p.name, line, err)
		}
		rs = append(rs, r)
	}
	return rs, nil
}
