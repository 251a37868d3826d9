package deploy_test

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/agent/capture"
	"github.com/trustmesh/trustmesh/deploy"
)

// proxyCapsHelper, set to a PID, makes TestNodeProxyCapabilitiesHelper do
// what the node proxy does in that process's network namespace.
const proxyCapsHelper = "TRUSTMESH_TEST_PROXY_CAPS_PID"

// TestNodeProxyCapabilities checks on this kernel that the capabilities the
// chart gives the node proxy are the ones it needs, and that it needs each:
// a root process with the chart's bounding set does, through the proxy's
// own code (agent/capture), what the proxy does in a pod's network
// namespace (a process of another user in a namespace of its own): it
// installs and removes the redirection, listens there and connects there
// with its mark. Without any one of the chart's capabilities, some step
// fails.
func TestNodeProxyCapabilities(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: it makes a network namespace and runs processes with capabilities dropped")
	}
	if os.Getenv(proxyCapsHelper) != "" {
		t.Skip("the helper's own process")
	}
	for _, tool := range []string{"setpriv", "ip", "nsenter", "iptables-restore", "iptables-save"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("%s is needed (make test installs it): %v", tool, err)
		}
	}
	status, err := os.ReadFile("/proc/self/status")
	if err != nil {
		t.Fatal(err)
	}
	// NET_ADMIN is bit 12, SYS_PTRACE 19, SYS_ADMIN 21.
	for _, l := range strings.Split(string(status), "\n") {
		if b, ok := strings.CutPrefix(l, "CapBnd:"); ok {
			bnd, err := strconv.ParseUint(strings.TrimSpace(b), 16, 64)
			if err != nil {
				t.Fatal(err)
			}
			if want := uint64(1<<12 | 1<<19 | 1<<21); bnd&want != want {
				t.Skip("this test's own process lacks NET_ADMIN, SYS_PTRACE or SYS_ADMIN (a container without them): it cannot show the proxy's")
			}
		}
	}
	objs, err := deploy.Render(deploy.RenderOptions{Values: ambientValues()})
	if err != nil {
		t.Fatal(err)
	}
	caps := nodeCapabilities(t, &daemonSet(t, objs, "trustmesh-node").Spec.Template.Spec.Containers[0])

	// A pod: a process of another user in a network namespace of its own.
	name := fmt.Sprintf("tm-proxycaps-%d", os.Getpid())
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
	if out, err := exec.Command("ip", "-n", name, "link", "set", "lo", "up").CombinedOutput(); err != nil {
		t.Fatalf("lo up: %v: %s", err, out)
	}
	sleep, err := exec.LookPath("sleep")
	if err != nil {
		t.Fatal(err)
	}
	pod := exec.Command("ip", "netns", "exec", name, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--", sleep, "60")
	if err := pod.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = pod.Process.Kill(); _ = pod.Wait() })
	pid := pod.Process.Pid
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if exe, _ := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); filepath.Base(exe) == "sleep" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the pod's process did not start")
		}
	}

	// steps runs the helper with the bounding set and returns what it
	// reports.
	steps := func(bounding string) string {
		t.Helper()
		cmd := exec.Command("setpriv", "--bounding-set="+bounding, "--inh-caps=-all", "--",
			os.Args[0], "-test.run=^TestNodeProxyCapabilitiesHelper$", "-test.count=1", "-test.v")
		cmd.Env = append(os.Environ(), proxyCapsHelper+"="+strconv.Itoa(pid))
		out, _ := cmd.CombinedOutput()
		t.Logf("%s:\n%s", bounding, out)
		return string(out)
	}
	set := func(caps []string) string {
		b := "-all"
		for _, c := range caps {
			b += ",+" + strings.ToLower(c)
		}
		return b
	}
	if out := steps(set(caps)); !strings.Contains(out, "proxy steps: all done") {
		t.Errorf("with the chart's capabilities %v the proxy cannot do its work in a pod's namespace", caps)
	}
	for i, c := range caps {
		fewer := append(append([]string{}, caps[:i]...), caps[i+1:]...)
		if out := steps(set(fewer)); strings.Contains(out, "proxy steps: all done") || !strings.Contains(out, "proxy steps: failed") {
			t.Errorf("without %s the proxy still does its work: the chart need not give it", c)
		}
	}
}

// TestNodeProxyCapabilitiesHelper is run by TestNodeProxyCapabilities, with
// reduced capabilities, in the pod's namespace given by PID.
func TestNodeProxyCapabilitiesHelper(t *testing.T) {
	pid := os.Getenv(proxyCapsHelper)
	if pid == "" {
		t.Skip("run by TestNodeProxyCapabilities")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	n := capture.Netns{Path: "/proc/" + pid + "/ns/net"}
	err := func() error {
		if err := capture.Install(ctx, n, capture.DefaultRules()); err != nil {
			return fmt.Errorf("install: %w", err)
		}
		defer func() { _ = capture.Remove(context.Background(), n) }()
		l, err := n.Listen(ctx, "tcp", "0.0.0.0:15008", capture.DefaultMark)
		if err != nil {
			return fmt.Errorf("listen: %w", err)
		}
		defer l.Close()
		go func() {
			if c, err := l.Accept(); err == nil {
				_ = c.Close()
			}
		}()
		c, err := n.Dial(ctx, "tcp", net.JoinHostPort("127.0.0.1", "15008"), capture.DefaultMark)
		if err != nil {
			return fmt.Errorf("dial: %w", err)
		}
		_ = c.Close()
		if err := capture.Remove(ctx, n); err != nil {
			return fmt.Errorf("remove: %w", err)
		}
		return nil
	}()
	if err != nil {
		fmt.Printf("proxy steps: failed: %v\n", err)
		return
	}
	fmt.Println("proxy steps: all done")
}
