package ambientnet

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

const td = "spiffe://cluster.local"

func sa(name string) string { return td + "/ns/demo/sa/" + name }

// recheckBound is how long a policy change may take to reach an open or a
// new connection: "within seconds", generous for a loaded 2-core CI box.
const recheckBound = 15 * time.Second

func workload(name, id, node string, p *pod, mode string, labels string) string {
	s := fmt.Sprintf(`---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: %s, namespace: demo}
spec:
  spiffeID: %s
  node: %s
  addresses: [%s, "%s"]
  dataplaneMode: %s
`, name, id, node, p.ip4, p.ip6, mode)
	if mode == "ambient" {
		s += "  netns: " + p.netns + "\n"
	}
	if labels != "" {
		s += "  labels: " + labels + "\n"
	}
	return s
}

const denyClient = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-client, namespace: demo}
spec:
  selector:
    matchLabels: {app: server}
  action: DENY
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
`

// TestAmbientRealTraffic is the end-to-end test: every assertion of
// "An end-to-end test with real traffic", with real namespaces, routes,
// proxies and unmodified apps.
func TestAmbientRealTraffic(t *testing.T) {
	needRoot(t)
	tp := newTopology(t)
	clientA := tp.addPod(t, "client-a", "a", 2)
	serverA := tp.addPod(t, "server-a", "a", 3)
	plainA := tp.addPod(t, "plain-a", "a", 4)
	serverB := tp.addPod(t, "server-b", "b", 2)
	plainB := tp.addPod(t, "plain-b", "b", 3)
	fakeB := tp.addPod(t, "fake-b", "b", 4)

	// client-a, server-a and server-b are ambient; plain-a and plain-b are
	// outside the mesh; billing-0 is a sidecar pod at fake-b's address, where
	// an impostor holding another identity answers HBONE.
	meshFile := workload("client-0", sa("client"), "node-a", clientA, "ambient", "") +
		workload("server-0", sa("server"), "node-a", serverA, "ambient", "{app: server}") +
		workload("server-1", sa("server"), "node-b", serverB, "ambient", "{app: server}") +
		workload("billing-0", sa("billing"), "node-b", fakeB, "sidecar", "") +
		`---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: impostor-0, namespace: demo}
spec:
  spiffeID: ` + sa("impostor") + `
`
	nodes := fmt.Sprintf(`apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: node-a}
spec:
  workloads:
  - spiffeID: %s
    selectors: {netns: %s}
  - spiffeID: %s
    selectors: {netns: %s}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: node-b}
spec:
  workloads:
  - spiffeID: %s
    selectors: {netns: %s}
  - spiffeID: %s
    selectors: {netns: %s}
`, sa("client"), clientA.netns, sa("server"), serverA.netns, sa("server"), serverB.netns, sa("impostor"), fakeB.netns)

	dir, err := os.MkdirTemp("", "tm-anet")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	s := startServe(t, dir, map[string]string{"workloads.yaml": meshFile, "nodes.yaml": nodes}, nil)

	// The apps start before the proxies, as pods would: capture must take
	// them as they are.
	for _, p := range []*pod{serverA, serverB, plainB} {
		app := start(t, "app in "+p.name, p.cmd(context.Background(), appBin, "serve", "-name", p.name))
		app.waitLine(t, 10*time.Second, "serving", func(l string) bool { return l == "serving" })
	}
	nodeA, _ := startNode(t, s, dir, "node-a", "10.77.0.1")
	nodeB, _ := startNode(t, s, dir, "node-b", "10.77.0.2")

	// Ready: each proxy says it captures its ambient pods (it says so once
	// the rules and listeners are in place). A call that merely succeeds
	// proves nothing: before capture, the pods talk in plaintext.
	for _, c := range []struct {
		node     *proc
		workload string
	}{{nodeA, "demo/client-0"}, {nodeA, "demo/server-0"}, {nodeB, "demo/server-1"}} {
		c.node.waitLine(t, 90*time.Second, "capture of "+c.workload, func(l string) bool {
			return strings.Contains(l, `msg="capturing an ambient pod"`) && strings.Contains(l, "workload="+c.workload+" ")
		})
	}
	url := func(p *pod) string { return "http://" + p.ip4 + ":8080/" }
	if out, err := clientA.curl(url(serverB)); err != nil || !strings.Contains(out, "hello from server-b") {
		t.Fatalf("client-a → server-b once both proxies capture: %v %q", err, out)
	}

	t.Run("CrossNodeAndSameNode", func(t *testing.T) {
		for _, c := range []struct {
			from, to *pod
		}{{clientA, serverB}, {clientA, serverA}, {serverA, serverB}} {
			out, err := c.from.curl(url(c.to))
			if err != nil || !strings.Contains(out, "hello from "+c.to.name) {
				t.Errorf("curl %s → %s: %v %q", c.from.name, c.to.name, err, out)
			}
			msg := "echo " + c.from.name + " to " + c.to.name
			if got, err := c.from.send(c.to.ip4+":9000", msg); err != nil || got != msg {
				t.Errorf("echo %s → %s: %v %q", c.from.name, c.to.name, err, got)
			}
		}
	})

	t.Run("IPv6", func(t *testing.T) {
		out, err := clientA.curl("http://[" + serverB.ip6 + "]:8080/")
		if err != nil || !strings.Contains(out, "hello from server-b") {
			t.Errorf("curl client-a → [%s]: %v %q", serverB.ip6, err, out)
		}
		if got, err := clientA.send("["+serverA.ip6+"]:9000", "v6"); err != nil || got != "v6" {
			t.Errorf("echo client-a → [%s] (same node): %v %q", serverA.ip6, err, got)
		}
	})

	t.Run("LinkCarriesTLSOnly", func(t *testing.T) {
		pcap := filepath.Join(dir, "link.pcap")
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		dump := start(t, "tcpdump", exec.CommandContext(ctx, "ip", "netns", "exec", tp.nodeA,
			"tcpdump", "--immediate-mode", "-i", tp.linkA, "-s", "0", "-U", "-n", "-w", pcap, "tcp"))
		dump.waitLine(t, 10*time.Second, "tcpdump listening", func(l string) bool { return strings.Contains(l, "listening on") })
		secret := "TRUSTMESH-SECRET-PAYLOAD-" + strings.Repeat("x", 64)
		clear := "TRUSTMESH-CLEAR-CONTROL-" + strings.Repeat("y", 64)
		if got, err := clientA.send(serverB.ip4+":9000", secret); err != nil || got != secret {
			t.Fatalf("meshed echo: %v %q", err, got)
		}
		if got, err := clientA.send("["+serverB.ip6+"]:9000", secret); err != nil || got != secret {
			t.Fatalf("meshed echo (IPv6): %v %q", err, got)
		}
		// The control: the same capture sees plaintext between pods
		// outside the mesh, so it would see the mesh's if there were any.
		if got, err := plainA.send(plainB.ip4+":9000", clear); err != nil || got != clear {
			t.Fatalf("plain echo: %v %q", err, got)
		}
		time.Sleep(500 * time.Millisecond)
		dump.stop()
		segs, err := readPcap(pcap)
		if err != nil {
			t.Fatal(err)
		}
		if !containsAny(segs, []byte(clear)) {
			t.Fatalf("the capture did not see the plaintext control exchange (%d segments): it cannot show anything", len(segs))
		}
		meshed := map[netip.Addr]bool{}
		for _, p := range []*pod{clientA, serverA, serverB} {
			meshed[netip.MustParseAddr(p.ip4)], meshed[netip.MustParseAddr(p.ip6)] = true, true
		}
		tlsFlows := 0
		for k, b := range streams(segs) {
			if bytes.Contains(b, []byte(secret)) || bytes.Contains(b, []byte("TRUSTMESH-SECRET")) {
				t.Errorf("flow %s → %s carries the payload in clear", k.src, k.dst)
			}
			if !meshed[k.src.Addr()] && !meshed[k.dst.Addr()] {
				continue
			}
			if k.src.Port() != 15008 && k.dst.Port() != 15008 {
				t.Errorf("flow %s → %s of a meshed pod is not HBONE (port 15008)", k.src, k.dst)
				continue
			}
			n, err := tlsRecords(b)
			if err != nil {
				t.Errorf("flow %s → %s: %v", k.src, k.dst, err)
			}
			if n > 0 {
				tlsFlows++
			}
		}
		// Each echo is a connection each way, in each family.
		if tlsFlows < 4 {
			t.Errorf("%d TLS flows on the link, want at least 4 (both ways, IPv4 and IPv6)", tlsFlows)
		}
	})

	t.Run("OutsideTheMeshRefused", func(t *testing.T) {
		// The network itself works: a plain pod reaches another.
		if got, err := plainA.send(plainB.ip4+":9000", "plain"); err != nil || got != "plain" {
			t.Fatalf("plain-a → plain-b: %v %q", err, got)
		}
		for _, from := range []*pod{plainA, plainB} {
			if out, err := from.curl(url(serverB)); err == nil {
				t.Errorf("%s (outside the mesh) reached server-b in plaintext: %q", from.name, out)
				for _, q := range []*pod{serverA, serverB} {
					rules, err := q.run(10*time.Second, "iptables-save")
					t.Logf("%s's rules (%v):\n%s", q.name, err, rules)
				}
			}
			if got, err := from.send(serverA.ip4+":9000", "plain"); err == nil {
				t.Errorf("%s (outside the mesh) reached server-a's echo in plaintext: %q", from.name, got)
			}
		}
	})

	t.Run("WrongIdentityRefused", func(t *testing.T) {
		imp := start(t, "impostor", fakeB.cmd(context.Background(), appBin, "impostor", "-socket", nodeSocket(dir, "node-b")))
		imp.waitLine(t, 30*time.Second, "impostor's SVID", func(l string) bool { return strings.Contains(l, "impostor serving as "+sa("impostor")) })
		out, err := clientA.curl(url(fakeB))
		if err == nil {
			t.Errorf("client-a reached billing-0's address, answered by %s: %q", sa("impostor"), out)
		}
		imp.waitLine(t, 10*time.Second, "connection from client-a's proxy", func(l string) bool {
			return strings.HasPrefix(l, "connection from "+clientA.ip4+":")
		})
		for _, l := range imp.output() {
			if strings.HasPrefix(l, "tunnel from") {
				t.Errorf("the impostor got a tunnel: %s", l)
			}
		}
	})

	t.Run("DenyWhileOpenThenRemove", func(t *testing.T) {
		hold := start(t, "hold client-a → server-b", clientA.cmd(context.Background(), appBin, "hold", "-addr", serverB.ip4+":9000", "-for", "2m"))
		hold.waitLine(t, 20*time.Second, "exchanges", func(l string) bool { return l == "ok 3" })
		policy := filepath.Join(s.policyDir, "deny-client.yaml")
		added := time.Now()
		writeFile(t, policy, denyClient)
		select {
		case <-hold.exited:
			t.Logf("the open connection closed %s after the DENY was written: %v\n%s", time.Since(added).Round(10*time.Millisecond), hold.err, hold.tail(2))
			if hold.err == nil {
				t.Errorf("the held connection ended without an error")
			}
		case <-time.After(recheckBound):
			t.Fatalf("the open connection from client-a still works %s after a DENY of its principal:\n%s", recheckBound, hold.tail(5))
		}
		// New connections from the denied principal are refused, on both
		// nodes; another principal to the same workloads still passes.
		for _, to := range []*pod{serverB, serverA} {
			if out, err := clientA.curl(url(to)); err == nil {
				t.Errorf("client-a reached %s under a DENY of its principal: %q", to.name, out)
			}
		}
		if out, err := serverA.curl(url(serverB)); err != nil || !strings.Contains(out, "hello from server-b") {
			t.Errorf("server-a (not denied) → server-b: %v %q", err, out)
		}
		found := false
		for _, l := range s.output() {
			if strings.Contains(l, "deny-client") && strings.Contains(l, sa("client")[len("spiffe://"):]) {
				found = true
				break
			}
		}
		if !found {
			t.Errorf("no decision log line of trustmesh serve names the policy deny-client and the denied principal")
		}

		if err := os.Remove(policy); err != nil {
			t.Fatal(err)
		}
		removed := time.Now()
		for {
			out, err := clientA.curl(url(serverB))
			if err == nil && strings.Contains(out, "hello from server-b") {
				t.Logf("allowed again %s after the DENY was removed", time.Since(removed).Round(10*time.Millisecond))
				break
			}
			if time.Since(removed) > recheckBound {
				t.Fatalf("client-a still refused %s after the DENY was removed: %v %q", recheckBound, err, out)
			}
			time.Sleep(250 * time.Millisecond)
		}
	})
}

func nodeSocket(dir, node string) string { return filepath.Join(dir, node, "node.sock") }
