package ambientnet

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"
)

// topology: node A routes 10.77.1.0/24 and fd77:1::/64 on a bridge to its
// pods, node B 10.77.2.0/24 and fd77:2::/64; the nodes share the link
// 10.77.0.0/30, fd77::/64, whose end in A is linkA (where tcpdump listens).
type topology struct {
	prefix       string
	nodeA, nodeB string // network namespace names
	linkA        string // A's end of the A–B link
	pods         map[string]*pod
}

// pod is a network namespace with one veth into its node's bridge.
type pod struct {
	name, netns string
	ip4, ip6    string
}

func nsName(prefix, name string) string { return prefix + "-" + name }

func newTopology(t *testing.T) *topology {
	t.Helper()
	tp := &topology{prefix: fmt.Sprintf("tmn%d", os.Getpid()%100000), pods: map[string]*pod{}}
	tp.nodeA, tp.nodeB = nsName(tp.prefix, "node-a"), nsName(tp.prefix, "node-b")
	tp.linkA = "ab0"
	for _, ns := range []string{tp.nodeA, tp.nodeB} {
		addNetns(t, ns)
		ipns(t, ns, "link", "set", "lo", "up")
		ipns(t, ns, "link", "add", "br0", "type", "bridge", "forward_delay", "0")
		ipns(t, ns, "link", "set", "br0", "up")
		sh(t, "ip", "netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")
	}
	sh(t, "ip", "-n", tp.nodeA, "link", "add", "ab0", "type", "veth", "peer", "name", "ba0", "netns", tp.nodeB)
	for _, n := range []struct{ ns, dev, me4, me6, other, peer4, peer6, br4, br6 string }{
		{tp.nodeA, "ab0", "10.77.0.1/30", "fd77::1/64", "2", "10.77.0.2", "fd77::2", "10.77.1.1/24", "fd77:1::1/64"},
		{tp.nodeB, "ba0", "10.77.0.2/30", "fd77::2/64", "1", "10.77.0.1", "fd77::1", "10.77.2.1/24", "fd77:2::1/64"},
	} {
		ipns(t, n.ns, "addr", "add", n.me4, "dev", n.dev)
		ipns(t, n.ns, "-6", "addr", "add", n.me6, "dev", n.dev, "nodad")
		ipns(t, n.ns, "link", "set", n.dev, "up")
		ipns(t, n.ns, "addr", "add", n.br4, "dev", "br0")
		ipns(t, n.ns, "-6", "addr", "add", n.br6, "dev", "br0", "nodad")
		ipns(t, n.ns, "route", "add", "10.77."+n.other+".0/24", "via", n.peer4)
		ipns(t, n.ns, "-6", "route", "add", "fd77:"+n.other+"::/64", "via", n.peer6)
	}
	return tp
}

// addNetns makes a named network namespace (under /run/netns), removed at
// cleanup with everything in it.
func addNetns(t *testing.T, name string) {
	t.Helper()
	_ = exec.Command("ip", "netns", "del", name).Run() // a leftover of a killed run
	sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
}

func ipns(t *testing.T, ns string, args ...string) {
	t.Helper()
	sh(t, "ip", append([]string{"-n", ns}, args...)...)
}

// addPod makes pod name on node ("a" or "b") with host number n: 10.77.X.n
// and fd77:X::n.
func (tp *topology) addPod(t *testing.T, name, node string, n int) *pod {
	t.Helper()
	nodeNS, x := tp.nodeA, "1"
	if node == "b" {
		nodeNS, x = tp.nodeB, "2"
	}
	p := &pod{name: name, netns: nsName(tp.prefix, name), ip4: fmt.Sprintf("10.77.%s.%d", x, n), ip6: fmt.Sprintf("fd77:%s::%d", x, n)}
	addNetns(t, p.netns)
	host := fmt.Sprintf("v%s%d", x, n)
	sh(t, "ip", "-n", nodeNS, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", p.netns)
	ipns(t, nodeNS, "link", "set", host, "master", "br0")
	ipns(t, nodeNS, "link", "set", host, "up")
	ipns(t, p.netns, "link", "set", "lo", "up")
	ipns(t, p.netns, "addr", "add", p.ip4+"/24", "dev", "eth0")
	ipns(t, p.netns, "-6", "addr", "add", p.ip6+"/64", "dev", "eth0", "nodad")
	ipns(t, p.netns, "link", "set", "eth0", "up")
	ipns(t, p.netns, "route", "add", "default", "via", "10.77."+x+".1")
	ipns(t, p.netns, "-6", "route", "add", "default", "via", "fd77:"+x+"::1")
	tp.pods[name] = p
	return p
}

// in runs a command in the pod's network namespace, as an app would run.
func (p *pod) cmd(ctx context.Context, name string, args ...string) *exec.Cmd {
	return exec.CommandContext(ctx, "ip", append([]string{"netns", "exec", p.netns, name}, args...)...)
}

// run runs a command in the pod with a timeout and returns its output and error.
func (p *pod) run(d time.Duration, name string, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	out, err := p.cmd(ctx, name, args...).CombinedOutput()
	return strings.TrimSpace(string(out)), err
}

// curl fetches url from the pod: the body, or an error.
func (p *pod) curl(url string) (string, error) {
	return p.run(15*time.Second, "curl", "-sS", "-g", "--max-time", "8", url)
}

// send exchanges data with an echo at addr from the pod.
func (p *pod) send(addr, data string) (string, error) {
	return p.run(15*time.Second, appBin, "send", "-addr", addr, "-data", data)
}
