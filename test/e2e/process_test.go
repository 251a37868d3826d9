package e2e

import (
	"bytes"
	"context"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/trustmesh/trustmesh/agent/certdir"
	"github.com/trustmesh/trustmesh/api/probe"
	"github.com/trustmesh/trustmesh/internal/freeport"
)

var (
	buildOnce sync.Once
	binDir    string // removed by TestMain
	binary    string
	buildErr  error
	buildOut  []byte
)

// trustmeshBinary builds cmd/trustmesh once per test binary; TestMain
// removes it.
func trustmeshBinary(t *testing.T) string {
	t.Helper()
	buildOnce.Do(func() {
		binDir, buildErr = os.MkdirTemp("", "trustmesh-bin")
		if buildErr != nil {
			return
		}
		binary = filepath.Join(binDir, "trustmesh")
		buildOut, buildErr = exec.Command("go", "build", "-o", binary, "github.com/trustmesh/trustmesh/cmd/trustmesh").CombinedOutput()
	})
	if buildErr != nil {
		t.Fatalf("build trustmesh: %v\n%s", buildErr, buildOut)
	}
	return binary
}

type proc struct {
	cmd    *exec.Cmd
	stderr *syncBuffer
	done   chan error
}

// startProc runs the binary with args; the process is killed at cleanup.
func startProc(t *testing.T, env []string, args ...string) *proc {
	t.Helper()
	p := &proc{cmd: exec.Command(trustmeshBinary(t), args...), stderr: &syncBuffer{}, done: make(chan error, 1)}
	p.cmd.Env = append(os.Environ(), env...)
	p.cmd.Stderr = p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- p.cmd.Wait() }()
	t.Cleanup(func() {
		_ = p.cmd.Process.Kill()
		<-p.done
		if t.Failed() {
			t.Logf("trustmesh %s stderr:\n%s", args[0], p.stderr.String())
		}
	})
	return p
}

func waitHTTP(t *testing.T, p *proc, url string) {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		resp, err := http.Get(url)
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return
			}
		}
		select {
		case err := <-p.done:
			t.Fatalf("process exited (%v) before %s was OK:\n%s", err, url, p.stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s never OK:\n%s", url, p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func run(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(trustmeshBinary(t), args...).Output()
	if err != nil {
		var stderr []byte
		if ee, ok := err.(*exec.ExitError); ok {
			stderr = ee.Stderr
		}
		t.Fatalf("trustmesh %s: %v\n%s", strings.Join(args, " "), err, stderr)
	}
	return string(out)
}

// TestProcessesEndToEnd is the end-to-end test, all as processes:
// trustmesh serve, trustmesh ca token create, trustmesh agent with that
// join token, and an unchanged go-spiffe client fetching the SVID.
func TestProcessesEndToEnd(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and runs the trustmesh binary")
	}
	if out, err := exec.Command(trustmeshBinary(t), "agent", "--help").CombinedOutput(); err != nil {
		t.Fatalf("trustmesh has no agent command (newAgentCmd must be added to the root command in cmd/trustmesh/main.go): %v\n%s", err, out)
	}
	dir, err := os.MkdirTemp("", "e2e")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	dataDir := filepath.Join(dir, "data")
	caAddr, caMon := freeport.Addr(t), freeport.Addr(t)

	serve := startProc(t, nil, "serve", "--data-dir", dataDir, "--kubernetes", "off",
		"--listen-ca", caAddr, "--listen-monitoring", caMon, "--listen-bundle", "", "--listen-ui", "off")
	waitHTTP(t, serve, "http://"+caMon+"/readyz")

	id := spiffeid.RequireFromString("spiffe://cluster.local/vm/billing-7")
	token := strings.TrimSpace(run(t, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", id.String(), "--ttl", "10m"))
	if token == "" || strings.Contains(token, "\n") {
		t.Fatalf("token create printed %q, want only the token", token)
	}
	tokenFile := filepath.Join(dir, "join-token")
	if err := os.WriteFile(tokenFile, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	bundleFile := filepath.Join(dir, "ca.pem")
	if err := os.WriteFile(bundleFile, []byte(run(t, "ca", "bundle", "--data-dir", dataDir)), 0o600); err != nil {
		t.Fatal(err)
	}

	// The application: its one probe is a TCP connect, which the agent
	// runs for the kubelet as the injector asks it to.
	app, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer app.Close()
	probers, err := probe.Probers{
		probe.Path("billing", probe.Readiness): {TCPSocket: &probe.TCPSocket{Port: int32(app.Addr().(*net.TCPAddr).Port)}},
	}.Encode()
	if err != nil {
		t.Fatal(err)
	}

	socketPath := filepath.Join(dir, "agent.sock")
	agentMon := freeport.Addr(t)
	agent := startProc(t, []string{probe.EnvVar + "=" + probers}, "agent", "--ca-address", caAddr, "--ca-bundle", bundleFile,
		"--join-token-file", tokenFile, "--socket", socketPath, "--listen-monitoring", agentMon,
		"--cert-dir", filepath.Join(dir, "certs"))
	waitHTTP(t, agent, "http://"+agentMon+"/healthz")
	for path, want := range map[string]int{
		probe.Path("billing", probe.Readiness): http.StatusOK,
		probe.Path("billing", probe.Liveness):  http.StatusNotFound,
	} {
		resp, err := http.Get("http://" + agentMon + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != want {
			t.Fatalf("GET %s on the agent: %d, want %d", path, resp.StatusCode, want)
		}
	}

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	x509ctx, err := workloadapi.FetchX509Context(ctx, workloadapi.WithAddr("unix://"+socketPath))
	if err != nil {
		t.Fatalf("go-spiffe fetch: %v\n%s", err, agent.stderr.String())
	}
	svid := x509ctx.DefaultSVID()
	gotID, _, err := x509svid.Verify(svid.Certificates, x509ctx.Bundles)
	if err != nil {
		t.Fatalf("SVID does not verify against the fetched bundle: %v", err)
	}
	if gotID != id || svid.ID != id {
		t.Fatalf("SVID for %s, want %s, the ID the token was bound to", gotID, id)
	}

	// --cert-dir holds the same identity, in Istio's file names.
	certDir := filepath.Join(dir, "certs")
	waitFor(t, func() bool { _, err := os.Stat(filepath.Join(certDir, certdir.CertChainFile)); return err == nil }, "cert-chain.pem")
	fileSVID, err := x509svid.Load(filepath.Join(certDir, certdir.CertChainFile), filepath.Join(certDir, certdir.KeyFile))
	if err != nil {
		t.Fatalf("cert-dir files: %v", err)
	}
	if fileSVID.ID != id {
		t.Fatalf("cert-chain.pem names %s, want %s", fileSVID.ID, id)
	}

	// Resident memory at steady state, for the record.
	if rss, err := residentKiB(agent.cmd.Process.Pid); err == nil {
		t.Logf("trustmesh agent resident memory at steady state: %d KiB", rss)
	}

	// SIGTERM is a clean exit that removes the socket.
	if err := agent.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-agent.done:
		agent.done <- err
		if err != nil {
			t.Fatalf("agent exited with %v after SIGTERM:\n%s", err, agent.stderr.String())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("agent did not exit on SIGTERM")
	}
	if _, err := os.Lstat(socketPath); !os.IsNotExist(err) {
		t.Fatalf("socket left behind after exit: %v", err)
	}
}

// residentKiB reads VmRSS of a process.
func residentKiB(pid int) (int, error) {
	b, err := os.ReadFile(filepath.Join("/proc", strconv.Itoa(pid), "status"))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmRSS:"); ok {
			return strconv.Atoi(strings.Fields(v)[0])
		}
	}
	return 0, os.ErrNotExist
}

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
