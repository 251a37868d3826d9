//go:build linux

package capture

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test makes network namespaces, veth pairs and iptables rules")
	}
	for _, cmd := range []string{"ip", "nsenter", "iptables-restore", "ip6tables-restore"} {
		if _, err := exec.LookPath(cmd); err != nil {
			t.Fatalf("%s is missing (make test installs it with hack/debian-tools.sh): %v", cmd, err)
		}
	}
}

func sh(t *testing.T, args ...string) string {
	t.Helper()
	out, err := exec.Command(args[0], args[1:]...).CombinedOutput()
	if err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

var nsSeq atomic.Int64

// newNetns makes a network namespace with lo up and deletes it when the
// test ends.
func newNetns(t *testing.T) (Netns, string) {
	t.Helper()
	name := fmt.Sprintf("tmcap-%d-%d", os.Getpid(), nsSeq.Add(1))
	sh(t, "ip", "netns", "add", name)
	t.Cleanup(func() {
		if out, err := exec.Command("ip", "netns", "del", name).CombinedOutput(); err != nil {
			t.Errorf("ip netns del %s: %v: %s", name, err, out)
		}
	})
	sh(t, "ip", "-n", name, "link", "set", "lo", "up")
	return NetnsByName(name), name
}

// pod is a namespace with eth0 joined to a peer's.
type pod struct {
	ns       Netns
	name     string
	ip4, ip6 netip.Addr
}

// podPair makes two namespaces joined by a veth pair, with 10.77.0.1-2/24
// and fd77::1-2/64.
func podPair(t *testing.T) (a, b pod) {
	t.Helper()
	a.ns, a.name = newNetns(t)
	b.ns, b.name = newNetns(t)
	a.ip4, b.ip4 = netip.MustParseAddr("10.77.0.1"), netip.MustParseAddr("10.77.0.2")
	a.ip6, b.ip6 = netip.MustParseAddr("fd77::1"), netip.MustParseAddr("fd77::2")
	sh(t, "ip", "-n", a.name, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b.name)
	for _, p := range []pod{a, b} {
		sh(t, "ip", "-n", p.name, "addr", "add", p.ip4.String()+"/24", "dev", "eth0")
		sh(t, "ip", "-n", p.name, "-6", "addr", "add", p.ip6.String()+"/64", "dev", "eth0", "nodad")
		sh(t, "ip", "-n", p.name, "link", "set", "eth0", "up")
	}
	return a, b
}

func (p pod) addr(v6 bool) netip.Addr {
	if v6 {
		return p.ip6
	}
	return p.ip4
}

// tagServer accepts on l and answers every connection with one line:
// "TAG ORIGINAL-DST REMOTE LOCAL" (ORIGINAL-DST "-" when there is none),
// then echoes.
func tagServer(t *testing.T, l net.Listener, tag string) {
	t.Helper()
	t.Cleanup(func() { l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				od := "-"
				if ap, err := OriginalDst(c); err == nil {
					od = ap.String()
				}
				fmt.Fprintf(c, "%s %s %s %s\n", tag, od, c.RemoteAddr(), c.LocalAddr())
				buf := make([]byte, 1024)
				for {
					n, err := c.Read(buf)
					if err != nil {
						return
					}
					if _, err := c.Write(buf[:n]); err != nil {
						return
					}
				}
			}()
		}
	}()
}

func listen(t *testing.T, n Netns, addr, tag string) {
	t.Helper()
	l, err := n.Listen(context.Background(), "tcp", addr, 0)
	if err != nil {
		t.Fatal(err)
	}
	tagServer(t, l, tag)
}

// hello is what a tagServer answered on one connection.
type hello struct{ tag, origDst, remote, local string }

// call connects from n to dst with mark, reads the server's line and checks
// that an echo comes back.
func call(t *testing.T, n Netns, dst netip.AddrPort, mark int) (hello, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	c, err := n.Dial(ctx, "tcp", dst.String(), mark)
	if err != nil {
		return hello{}, err
	}
	return readHello(t, c)
}

func readHello(t *testing.T, c net.Conn) (hello, error) {
	t.Helper()
	defer c.Close()
	c.SetDeadline(time.Now().Add(5 * time.Second))
	r := bufio.NewReader(c)
	line, err := r.ReadString('\n')
	if err != nil {
		return hello{}, fmt.Errorf("reading the server's line: %w", err)
	}
	f := strings.Fields(line)
	if len(f) != 4 {
		return hello{}, fmt.Errorf("server line %q", line)
	}
	if _, err := c.Write([]byte("ping")); err != nil {
		return hello{}, err
	}
	buf := make([]byte, 4)
	if _, err := r.Read(buf); err != nil || string(buf) != "ping" {
		return hello{}, fmt.Errorf("echo: %q, %v", buf, err)
	}
	return hello{f[0], f[1], f[2], f[3]}, nil
}

func mustCall(t *testing.T, n Netns, dst netip.AddrPort, mark int, wantTag string) hello {
	t.Helper()
	h, err := call(t, n, dst, mark)
	if err != nil {
		t.Fatalf("%s to %v (mark %#x): %v", n, dst, mark, err)
	}
	if h.tag != wantTag {
		t.Fatalf("%s to %v (mark %#x) reached %q (%+v), want %q", n, dst, mark, h.tag, h, wantTag)
	}
	return h
}

func remoteIP(t *testing.T, h hello) netip.Addr {
	t.Helper()
	ap, err := netip.ParseAddrPort(h.remote)
	if err != nil {
		t.Fatal(err)
	}
	return ap.Addr().Unmap()
}

func nsInode(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func saveAll(t *testing.T, n Netns) string {
	t.Helper()
	var all string
	for _, f := range families {
		out, err := n.run(context.Background(), "", f.save)
		if err != nil {
			t.Fatal(err)
		}
		// Drop comments (timestamps) and counters.
		for _, l := range strings.Split(out, "\n") {
			if !strings.HasPrefix(l, "#") {
				all += l + "\n"
			}
		}
	}
	return all
}

// TestDoThreadEnds: Do runs inside the namespace, and no thread of the
// process stays there afterwards: the locked thread ended.
func TestDoThreadEnds(t *testing.T) {
	requireRoot(t)
	n, _ := newNetns(t)
	want := nsInode(t, n.Path)
	host := nsInode(t, "/proc/self/ns/net")
	for range 20 {
		if err := n.Do(func() error {
			if got := nsInode(t, "/proc/thread-self/ns/net"); got != want {
				return fmt.Errorf("inside Do: netns %d, want %d", got, want)
			}
			return nil
		}); err != nil {
			t.Fatal(err)
		}
		if got := nsInode(t, "/proc/thread-self/ns/net"); got != host {
			t.Fatalf("the caller's thread moved to netns %d", got)
		}
	}
	// Threads end asynchronously; none may stay in the namespace.
	deadline := time.Now().Add(2 * time.Second)
	for {
		var stuck []string
		tasks, _ := filepath.Glob("/proc/self/task/*/ns/net")
		for _, p := range tasks {
			var st unix.Stat_t
			if unix.Stat(p, &st) == nil && st.Ino == want {
				stuck = append(stuck, strings.Split(p, "/")[4])
			}
		}
		if len(stuck) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("threads %v of process %d are still in the namespace after Do returned", stuck, os.Getpid())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if err := n.Do(func() error { return errors.New("boom") }); err == nil || err.Error() != "boom" {
		t.Errorf("Do returned %v, want fn's error", err)
	}
	if err := NetnsByName("tmcap-does-not-exist").Do(func() error { return nil }); err == nil {
		t.Error("Do in a namespace that does not exist succeeded")
	}
}

// TestListenDialStayInNamespace: sockets made inside a namespace are used
// from anywhere afterwards and stay in it; names are refused.
func TestListenDialStayInNamespace(t *testing.T) {
	requireRoot(t)
	a, b := podPair(t)
	for _, v6 := range []bool{false, true} {
		dst := netip.AddrPortFrom(b.addr(v6), 7070)
		listen(t, b.ns, dst.String(), "app")
		h := mustCall(t, a.ns, dst, 0, "app")
		if got := remoteIP(t, h); got != a.addr(v6) {
			t.Errorf("remote %v, want %v", got, a.addr(v6))
		}
	}
	// A loopback listener in b is b's loopback, not the node's.
	l, err := b.ns.Listen(context.Background(), "tcp", "127.0.0.1:0", 0)
	if err != nil {
		t.Fatal(err)
	}
	tagServer(t, l, "lo")
	if c, err := net.DialTimeout("tcp", l.Addr().String(), 300*time.Millisecond); err == nil {
		if h, err := readHello(t, c); err == nil && h.tag == "lo" {
			t.Errorf("b's loopback listener %v reachable from the node", l.Addr())
		}
	}
	mustCall(t, b.ns, netip.MustParseAddrPort(l.Addr().String()), 0, "lo")

	if _, err := a.ns.Dial(context.Background(), "tcp", "localhost:80", 0); err == nil || !strings.Contains(err.Error(), "not IP:port") {
		t.Errorf("dial by name: %v", err)
	}
	if _, err := a.ns.Listen(context.Background(), "udp", ":53", 0); err == nil {
		t.Error("a UDP listener was opened")
	}
}

// TestRedirect checks the REDIRECT rules in real namespaces, IPv4 and IPv6:
// a's plain connection lands on a's outbound listener with the original
// destination; the proxy's marked connection passes and lands, in b, on the
// plaintext listener, except to port 15008; loopback is left alone;
// re-Install changes nothing; Remove restores direct connectivity.
func TestRedirect(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	a, b := podPair(t)
	for _, p := range []pod{a, b} {
		listen(t, p.ns, ":15001", "outbound")
		listen(t, p.ns, ":15006", "plaintext")
		listen(t, p.ns, ":15008", "hbone")
		listen(t, p.ns, ":8080", "app")
	}
	r := DefaultRules()
	r.IPv6 = true
	for _, p := range []pod{a, b} {
		if err := Install(ctx, p.ns, r); err != nil {
			t.Fatal(err)
		}
	}
	for _, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[v6], func(t *testing.T) {
			app := netip.AddrPortFrom(b.addr(v6), 8080)
			h := mustCall(t, a.ns, app, 0, "outbound")
			if h.origDst != app.String() {
				t.Errorf("outbound original destination %s, want %v", h.origDst, app)
			}
			h = mustCall(t, a.ns, app, DefaultMark, "plaintext")
			if h.origDst != app.String() {
				t.Errorf("inbound original destination %s, want %v", h.origDst, app)
			}
			if got := remoteIP(t, h); got != a.addr(v6) {
				t.Errorf("inbound plaintext from %v, want %v (REDIRECT keeps the source)", got, a.addr(v6))
			}
			mustCall(t, a.ns, netip.AddrPortFrom(b.addr(v6), 15008), DefaultMark, "hbone")
			// Another mark is not the proxy's.
			mustCall(t, a.ns, app, DefaultMark+1, "outbound")
			// The pod talking to itself, over loopback or its own address.
			lo := netip.MustParseAddr("127.0.0.1")
			if v6 {
				lo = netip.IPv6Loopback()
			}
			mustCall(t, a.ns, netip.AddrPortFrom(lo, 8080), 0, "app")
			mustCall(t, a.ns, netip.AddrPortFrom(a.addr(v6), 8080), 0, "app")
		})
	}

	before := saveAll(t, a.ns)
	for _, want := range []string{"-A OUTPUT -j TRUSTMESH_OUTPUT", "-A PREROUTING -j TRUSTMESH_PREROUTING"} {
		if c := strings.Count(before, want+"\n"); c != 2 { // once per family
			t.Errorf("%q %d times, want once per family:\n%s", want, c, before)
		}
	}
	if err := Install(ctx, a.ns, r); err != nil {
		t.Fatal(err)
	}
	if after := saveAll(t, a.ns); after != before {
		t.Errorf("re-Install changed the rules:\nbefore:\n%s\nafter:\n%s", before, after)
	}

	// IPv4 only: the IPv6 rules go.
	r4 := DefaultRules()
	if err := Install(ctx, a.ns, r4); err != nil {
		t.Fatal(err)
	}
	mustCall(t, a.ns, netip.AddrPortFrom(b.ip4, 8080), 0, "outbound")
	mustCall(t, a.ns, netip.AddrPortFrom(b.ip6, 8080), DefaultMark+1, "plaintext") // b still captures

	// A rule of someone else's survives Remove.
	if _, err := a.ns.run(ctx, "", "iptables", "-t", "nat", "-A", "OUTPUT", "-p", "udp", "-j", "RETURN"); err != nil {
		t.Fatal(err)
	}
	for _, p := range []pod{a, b} {
		if err := Remove(ctx, p.ns); err != nil {
			t.Fatal(err)
		}
		if err := Remove(ctx, p.ns); err != nil {
			t.Fatalf("second Remove: %v", err)
		}
		if s := saveAll(t, p.ns); strings.Contains(s, "TRUSTMESH") {
			t.Errorf("after Remove:\n%s", s)
		}
	}
	if s := saveAll(t, a.ns); !strings.Contains(s, "-A OUTPUT -p udp -j RETURN") {
		t.Errorf("Remove took another rule:\n%s", s)
	}
	for _, v6 := range []bool{false, true} {
		mustCall(t, a.ns, netip.AddrPortFrom(b.addr(v6), 8080), 0, "app")
	}
}

// TestInstallRefusesBadRules: nothing is written for rules that would loop.
func TestInstallRefusesBadRules(t *testing.T) {
	requireRoot(t)
	n, _ := newNetns(t)
	before := saveAll(t, n)
	r := DefaultRules()
	r.Mark = 0
	if err := Install(context.Background(), n, r); err == nil {
		t.Fatal("rules without a mark installed")
	}
	if after := saveAll(t, n); after != before {
		t.Errorf("a refused Install wrote:\n%s", after)
	}
	if err := Install(context.Background(), NetnsByName("tmcap-does-not-exist"), DefaultRules()); err == nil {
		t.Error("Install into a namespace that does not exist succeeded")
	}
}

// TestInstallFailureUndone: an Install that fails half-way (IPv6 disabled
// in the namespace, so the IPv6 local route cannot be made after the IPv4
// rules and routes were) leaves none of trustmesh's rules behind.
func TestInstallFailureUndone(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	n, name := newNetns(t)
	sh(t, "ip", "netns", "exec", name, "sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.lo.disable_ipv6=1")
	r := DefaultRules()
	r.IPv6, r.TPROXY = true, true
	err := Install(ctx, n, r)
	if err == nil || !strings.Contains(err.Error(), "route replace local ::/0") {
		t.Fatalf("Install: %v, want the IPv6 route refused", err)
	}
	if s := saveAll(t, n); strings.Contains(s, "TRUSTMESH") {
		t.Errorf("a failed Install left rules:\n%s", s)
	}
	for _, f := range []string{"-4", "-6"} {
		if out, _ := n.run(ctx, "", "ip", f, "rule", "show", "pref", "32764"); strings.TrimSpace(out) != "" {
			t.Errorf("a failed Install left ip %s rule %q", f, out)
		}
	}
}

// TestTPROXY: inbound plaintext reaches a transparent listener with the
// original addresses; the proxy's transparent connection to the application
// shows the remote pod's address to it and gets its replies; the pod's own
// outbound connections still get theirs.
func TestTPROXY(t *testing.T) {
	requireRoot(t)
	ctx := context.Background()
	a, b := podPair(t)
	if err := ProbeTPROXY(ctx, b.ns, true); err != nil {
		t.Fatalf("this kernel (CI's) is to have TPROXY in namespaces: %v", err)
	}
	if after := saveAll(t, b.ns); strings.Contains(after, "TRUSTMESH") {
		t.Errorf("ProbeTPROXY left:\n%s", after)
	}
	r := DefaultRules()
	r.IPv6, r.TPROXY = true, true
	if err := Install(ctx, b.ns, r); err != nil {
		t.Fatal(err)
	}
	pl, err := b.ns.ListenTransparent(ctx, "tcp", ":15006", 0)
	if err != nil {
		t.Fatal(err)
	}
	tagServer(t, pl, "plaintext")
	listen(t, b.ns, ":15008", "hbone")
	listen(t, b.ns, ":8080", "app")
	listen(t, a.ns, ":9090", "a-app")
	for _, v6 := range []bool{false, true} {
		t.Run(map[bool]string{false: "IPv4", true: "IPv6"}[v6], func(t *testing.T) {
			app := netip.AddrPortFrom(b.addr(v6), 8080)
			h := mustCall(t, a.ns, app, 0, "plaintext")
			if h.origDst != app.String() || h.local != app.String() {
				t.Errorf("TPROXY'd connection: original destination %s, local %s, want %v", h.origDst, h.local, app)
			}
			if got := remoteIP(t, h); got != a.addr(v6) {
				t.Errorf("TPROXY'd connection from %v, want %v", got, a.addr(v6))
			}
			mustCall(t, a.ns, netip.AddrPortFrom(b.addr(v6), 15008), 0, "hbone")

			// The proxy, inside b, connects to the app as a.
			dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
			defer cancel()
			c, err := b.ns.DialTransparent(dctx, "tcp", a.addr(v6), app, DefaultMark)
			if err != nil {
				t.Fatal(err)
			}
			h, err = readHello(t, c)
			if err != nil {
				t.Fatalf("transparent connection: %v", err)
			}
			if h.tag != "app" || remoteIP(t, h) != a.addr(v6) {
				t.Errorf("the app saw %+v, want a connection from %v", h, a.addr(v6))
			}
			// The proxy's own outbound connection from b: its replies are
			// not taken by TPROXY.
			mustCall(t, b.ns, netip.AddrPortFrom(a.addr(v6), 9090), DefaultMark, "a-app")
		})
	}
	rules, err := b.ns.run(ctx, "", "ip", "rule", "show", "pref", "32764")
	if err != nil || !strings.Contains(rules, "fwmark 0x111/0xfff lookup 133") {
		t.Errorf("ip rule: %q, %v", rules, err)
	}
	if err := Install(ctx, b.ns, r); err != nil {
		t.Fatal(err)
	}
	if again, _ := b.ns.run(ctx, "", "ip", "rule", "show", "pref", "32764"); again != rules {
		t.Errorf("re-Install: ip rules %q, were %q", again, rules)
	}

	// Back to REDIRECT: mangle and the routing go.
	if err := Install(ctx, b.ns, DefaultRules()); err != nil {
		t.Fatal(err)
	}
	if s := saveAll(t, b.ns); strings.Contains(s, "TPROXY") || strings.Contains(s, "CONNMARK") {
		t.Errorf("REDIRECT after TPROXY keeps:\n%s", s)
	}
	for _, f := range []string{"-4", "-6"} {
		if out, _ := b.ns.run(ctx, "", "ip", f, "rule", "show", "pref", "32764"); strings.TrimSpace(out) != "" {
			t.Errorf("ip %s rule after REDIRECT: %q", f, out)
		}
		if out, _ := b.ns.run(ctx, "", "ip", f, "route", "show", "table", "133"); strings.TrimSpace(out) != "" {
			t.Errorf("ip %s route table 133 after REDIRECT: %q", f, out)
		}
	}
	if err := Remove(ctx, b.ns); err != nil {
		t.Fatal(err)
	}
	mustCall(t, a.ns, netip.AddrPortFrom(b.ip4, 8080), 0, "app")
}

// BenchmarkInstall is the time to capture one pod: Install of the default
// rules with IPv6 into a fresh namespace (the namespace's creation is not
// counted).
func BenchmarkInstall(b *testing.B) {
	if os.Geteuid() != 0 {
		b.Skip("needs root")
	}
	r := DefaultRules()
	r.IPv6 = true
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		name := fmt.Sprintf("tmcap-%d-bench-%d", os.Getpid(), i)
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			b.Fatalf("%v: %s", err, out)
		}
		b.StartTimer()
		err := Install(context.Background(), NetnsByName(name), r)
		b.StopTimer()
		exec.Command("ip", "netns", "del", name).Run()
		if err != nil {
			b.Fatal(err)
		}
	}
}
