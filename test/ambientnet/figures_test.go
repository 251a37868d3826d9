package ambientnet

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"
)

// FiguresEnv turns TestFigures on (make bench sets it): the figures are
// measurements to read, never a pass/fail gate, and take a minute or two.
const FiguresEnv = "TRUSTMESH_AMBIENTNET_FIGURES"

// TestFigures measures the node proxy against direct TCP between the same
// namespaces, in one run: first with no proxy (the pods not captured),
// then with both nodes' proxies capturing the same pods. For a pair on one
// node (over its bridge) and across nodes (over the veth link):
// single-stream throughput, p50/p99 of 64-byte round trips, sequential
// connection setup rate; for the proxies: memory per open connection
// (both node agents' RSS delta / N) and CPU per GB carried (both node
// agents' user+system time during the cross-node throughput run).
func TestFigures(t *testing.T) {
	needRoot(t)
	if os.Getenv(FiguresEnv) == "" {
		t.Skipf("figures, not a test: set %s=1 (make bench does)", FiguresEnv)
	}
	tp := newTopology(t)
	clientA := tp.addPod(t, "client-a", "a", 2)
	serverA := tp.addPod(t, "server-a", "a", 3)
	serverB := tp.addPod(t, "server-b", "b", 2)
	meshFile := workload("client-0", sa("client"), "node-a", clientA, "ambient", "") +
		workload("server-0", sa("server"), "node-a", serverA, "ambient", "{app: server}") +
		workload("server-1", sa("server"), "node-b", serverB, "ambient", "{app: server}")
	nodes := fmt.Sprintf(`apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: node-a}
spec:
  workloads:
  - {spiffeID: %s, selectors: {netns: %s}}
  - {spiffeID: %s, selectors: {netns: %s}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: node-b}
spec:
  workloads:
  - {spiffeID: %s, selectors: {netns: %s}}
`, sa("client"), clientA.netns, sa("server"), serverA.netns, sa("server"), serverB.netns)
	dir, err := os.MkdirTemp("", "tm-anetf")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	for _, p := range []*pod{serverA, serverB} {
		app := start(t, "app in "+p.name, p.cmd(context.Background(), appBin, "serve", "-name", p.name))
		app.waitLine(t, 10*time.Second, "serving", func(l string) bool { return l == "serving" })
	}
	pairs := []struct {
		name string
		to   *pod
	}{{"same node", serverA}, {"cross node", serverB}}
	const tputBytes = 128 << 20

	type row struct{ mbit, p50, p99, setup float64 }
	measure := func(to *pod) row {
		var r row
		var m map[string]float64
		m = benchRun(t, clientA, "-mode", "tput", "-addr", to.ip4+":9001", "-bytes", strconv.Itoa(tputBytes))
		r.mbit = m["mbit_s"]
		m = benchRun(t, clientA, "-mode", "rtt", "-addr", to.ip4+":9000", "-n", "2000")
		r.p50, r.p99 = m["p50_us"], m["p99_us"]
		m = benchRun(t, clientA, "-mode", "setup", "-addr", to.ip4+":9000", "-n", "300")
		r.setup = m["per_second"]
		return r
	}
	direct := map[string]row{}
	for _, p := range pairs {
		direct[p.name] = measure(p.to)
	}

	s := startServe(t, dir, map[string]string{"workloads.yaml": meshFile, "nodes.yaml": nodes}, nil)
	nodeA, _ := startNode(t, s, dir, "node-a", "10.77.0.1")
	nodeB, _ := startNode(t, s, dir, "node-b", "10.77.0.2")
	for _, c := range []struct {
		node     *proc
		workload string
	}{{nodeA, "demo/client-0"}, {nodeA, "demo/server-0"}, {nodeB, "demo/server-1"}} {
		c.node.waitLine(t, 90*time.Second, "capture of "+c.workload, func(l string) bool {
			return strings.Contains(l, `msg="capturing an ambient pod"`) && strings.Contains(l, "workload="+c.workload+" ")
		})
	}
	pids := []int{nodeA.cmd.Process.Pid, nodeB.cmd.Process.Pid}
	meshed := map[string]row{}
	var cpuPerGB float64
	for _, p := range pairs {
		if p.name == "cross node" {
			before := cpuSeconds(t, pids)
			m := benchRun(t, clientA, "-mode", "tput", "-addr", p.to.ip4+":9001", "-bytes", strconv.Itoa(tputBytes))
			cpuPerGB = (cpuSeconds(t, pids) - before) / (float64(tputBytes) / 1e9)
			_ = m
		}
		meshed[p.name] = measure(p.to)
	}

	// Memory per open connection, across nodes.
	const held = 500
	time.Sleep(2 * time.Second)
	rssBefore := rssKiB(t, pids)
	hold := start(t, "bench hold", clientA.cmd(context.Background(), appBin, "bench", "-mode", "hold", "-addr", serverB.ip4+":9000", "-n", strconv.Itoa(held)))
	hold.waitLine(t, 120*time.Second, "held", func(l string) bool { return l == "held" })
	time.Sleep(2 * time.Second)
	rssAfter := rssKiB(t, pids)
	hold.stop()

	fmt.Printf("\nambient node proxy vs direct TCP, same namespaces, one run (%s of throughput per stream; 64-byte round trips; sequential connections)\n", fmt.Sprintf("%d MiB", tputBytes>>20))
	fmt.Printf("%-11s %-7s %12s %10s %10s %12s\n", "pair", "path", "Mbit/s", "p50 µs", "p99 µs", "conns/s")
	for _, p := range pairs {
		for _, k := range []struct {
			path string
			r    row
		}{{"direct", direct[p.name]}, {"mesh", meshed[p.name]}} {
			fmt.Printf("%-11s %-7s %12.0f %10.0f %10.0f %12.0f\n", p.name, k.path, k.r.mbit, k.r.p50, k.r.p99, k.r.setup)
		}
		fmt.Printf("%-11s %-7s %12s %10.0f %10.0f\n", p.name, "added", "", meshed[p.name].p50-direct[p.name].p50, meshed[p.name].p99-direct[p.name].p99)
	}
	fmt.Printf("memory per open connection (both node agents, %d cross-node connections): %.1f KiB\n", held, float64(rssAfter-rssBefore)/held)
	fmt.Printf("CPU per GB carried cross-node (both node agents, user+system): %.2f CPU-seconds/GB\n", cpuPerGB)
}

func benchRun(t *testing.T, from *pod, args ...string) map[string]float64 {
	t.Helper()
	out, err := from.run(5*time.Minute, appBin, append([]string{"bench"}, args...)...)
	if err != nil {
		t.Fatalf("bench %v from %s: %v\n%s", args, from.name, err, out)
	}
	m := map[string]float64{}
	var raw map[string]any
	if err := json.Unmarshal([]byte(out), &raw); err != nil {
		t.Fatalf("bench printed %q: %v", out, err)
	}
	for k, v := range raw {
		if f, ok := v.(float64); ok {
			m[k] = f
		}
	}
	return m
}

// cpuSeconds is the user+system time of the processes (clock ticks of 1/100 s).
func cpuSeconds(t *testing.T, pids []int) float64 {
	t.Helper()
	var ticks float64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
		if err != nil {
			t.Fatal(err)
		}
		// The fields after the command name (which may hold spaces).
		f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+2:]))
		u, _ := strconv.ParseFloat(f[11], 64)
		s, _ := strconv.ParseFloat(f[12], 64)
		ticks += u + s
	}
	return ticks / 100
}

func rssKiB(t *testing.T, pids []int) int64 {
	t.Helper()
	var sum int64
	for _, pid := range pids {
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range strings.Split(string(b), "\n") {
			if strings.HasPrefix(l, "VmRSS:") {
				v, _ := strconv.ParseInt(strings.Fields(l)[1], 10, 64)
				sum += v
			}
		}
	}
	return sum
}
