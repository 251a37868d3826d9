package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/agent/capture"
	"github.com/trustmesh/trustmesh/agent/hbone"
	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
)

// authzChecks is how many ext_authz checks the proxy made so far.
func (e *env) authzChecks() int {
	e.authz.mu.Lock()
	defer e.authz.mu.Unlock()
	return len(e.authz.reqs)
}

// An unmodified app in pod a connects to b's own proxy ports. Before, a
// connection to b:15001 was tunnelled to b with :authority b:15001, and b's
// proxy dialled its own outbound listener, whose original destination was
// b:15001 again: one connection made about 1,000 tunnels and ext_authz
// checks in 3 s, all after the first with b's SVID (review16 F1).
func TestOutboundToProxyPortRefused(t *testing.T) {
	e := start(t)
	for _, port := range []int{15001, 15006, 15008} {
		addr := fmt.Sprintf("10.78.0.2:%d", port)
		c, err := capture.NetnsByName(e.a).Dial(context.Background(), "tcp4", addr, 0)
		if err == nil {
			_, _ = io.WriteString(c, "x")
			_ = c.SetReadDeadline(time.Now().Add(3 * time.Second))
			_, err = c.Read(make([]byte, 1))
			_ = c.Close()
		}
		// Refused: a reset (at times seen as EOF, the reset racing the
		// client's write); never an answer.
		if err == nil {
			t.Errorf("%s: answered, want refused", addr)
		}
	}
	time.Sleep(500 * time.Millisecond) // a loop, if any, shows by now
	if n := e.authzChecks(); n != 0 {
		t.Errorf("connections to b's proxy ports made %d ext_authz checks (tunnels), want 0", n)
	}
	if got := counter(t, e.proxyMetrics().refused, Outbound, "proxy_port"); got != 3 {
		t.Errorf("refused{outbound,proxy_port} = %v, want 3", got)
	}
}

// A peer that speaks HBONE itself asks b's proxy for b's proxy ports: the
// tunnel is refused before any check. Before, an :authority of b:15008
// let the peer run HBONE again inside the tunnel, and the inner check saw
// b's own address as the source and the real port (review16 F2), so a
// policy by source address or port was bypassed.
func TestInboundAuthorityProxyPortRefused(t *testing.T) {
	e := start(t)
	for _, port := range []int{15001, 15006, 15008} {
		raw, err := capture.NetnsByName(e.a).Dial(context.Background(), "tcp4", "10.78.0.2:15008", capture.DefaultMark)
		if err != nil {
			t.Fatal(err)
		}
		cfg := hbone.DialConfig{
			Cert:   func() (*tls.Certificate, error) { return certOf(e.ids, e.idA) },
			Bundle: e.ca.Bundle(), PeerID: e.idB, Authority: fmt.Sprintf("10.78.0.2:%d", port),
		}
		outer, err := hbone.Dial(context.Background(), raw, cfg)
		var st *hbone.StatusError
		if !errors.As(err, &st) || st.Code != 403 {
			t.Errorf("authority %s: %v, want refused (403)", cfg.Authority, err)
		}
		if err != nil {
			_ = raw.Close()
			continue
		}
		// The review's repro: HBONE inside the tunnel to the app.
		cfg.Authority = "10.78.0.2:8080"
		inner, err := hbone.Dial(context.Background(), outer, cfg)
		if err == nil {
			got, err := echo(inner, "nested")
			t.Errorf("a tunnel inside a tunnel reached the app: %q %v", got, err)
		}
		_ = raw.Close()
	}
	if n := e.authzChecks(); n != 0 {
		t.Errorf("%d ext_authz checks for tunnels to proxy ports, want 0", n)
	}
}

// captureBV4Only makes b a workload the mesh lists with IPv4 alone (its
// interface keeps fd78::2 and its link-local address) and waits until the
// proxy captures it as such.
func (e *env) captureBV4Only() {
	t := e.t
	e.setWorkload("b", e.b, "10.78.0.2", e.idB, ambientv1.DataPlaneMode_DATA_PLANE_MODE_NONE)
	waitFor(t, "b released", func() bool {
		e.p.mu.Lock()
		defer e.p.mu.Unlock()
		return len(e.p.pods) == 1
	})
	e.xds.setAny(ambientv1.WorkloadType, "b", workloadAny(t, &ambientv1.Workload{
		Uid: "b", Name: "b", Namespace: "default", SpiffeId: e.idB.String(), Node: "n1",
		Addresses: []string{"10.78.0.2"}, Labels: map[string]string{"app": "b"},
		Mode: ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT, Netns: e.b,
	}))
	waitFor(t, "b captured again", func() bool {
		e.p.mu.Lock()
		defer e.p.mu.Unlock()
		return len(e.p.pods) == 2
	})
}

// b is listed with IPv4 alone, but its interface has IPv6 too, as any
// Linux interface: plaintext over IPv6 (a global address, and the
// link-local one that every interface has) is refused as over IPv4. Before,
// no IPv6 rules were installed for such a pod, and a non-mesh peer reached
// b's application in plaintext, past STRICT and the policy (review16 F3).
func TestIPv6CapturedForV4OnlyWorkload(t *testing.T) {
	e := start(t)
	e.captureBV4Only()
	var ll string
	waitFor(t, "b's link-local address", func() bool {
		out, _ := exec.Command("ip", "-n", e.b, "-6", "-o", "addr", "show", "dev", "eth0", "scope", "link").Output()
		f := strings.Fields(string(out))
		for i, s := range f {
			if s == "inet6" && i+1 < len(f) && !strings.Contains(string(out), "tentative") {
				ll, _, _ = strings.Cut(f[i+1], "/")
				return true
			}
		}
		return false
	})
	// Marked: from a as a peer outside the mesh would send, uncaptured.
	for _, addr := range []string{"[fd78::2]:8080", "[" + ll + "%eth0]:8080"} {
		got, err := e.tryEcho(addr, capture.DefaultMark, "plain over v6")
		if err == nil {
			t.Errorf("plaintext to %s reached b's app uncaptured: %q", addr, got)
		}
	}
	if got := counter(t, e.proxyMetrics().refused, InboundPlaintext, "strict"); got < 2 {
		t.Errorf("refused{inbound_plaintext,strict} = %v, want 2", got)
	}
	// And over IPv4 the mesh still carries a's connections to b.
	if got, err := e.tryEcho("10.78.0.2:8080", 0, "v4"); err != nil || got != "v4" {
		t.Errorf("over IPv4 through the mesh: %q %v", got, err)
	}
}

// A pod whose namespace has IPv6 disabled (sysctl) is still captured, with
// the IPv6 rules installed all the same (they cost nothing there, and hold
// if a process of the pod enables IPv6 again).
func TestIPv6DisabledPodCaptured(t *testing.T) {
	e := start(t)
	for _, k := range []string{"net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1", "net.ipv6.conf.eth0.disable_ipv6=1"} {
		sh(t, "ip", "netns", "exec", e.b, "sysctl", "-qw", k)
	}
	e.captureBV4Only() // waits until b is captured again
	if got, err := e.tryEcho("10.78.0.2:8080", 0, "v4"); err != nil || got != "v4" {
		t.Errorf("over IPv4 through the mesh: %q %v", got, err)
	}
	out, err := exec.Command("ip", "netns", "exec", e.b, "ip6tables-save", "-t", "nat").CombinedOutput()
	if err != nil || !strings.Contains(string(out), "TRUSTMESH_PREROUTING") {
		t.Errorf("IPv6 rules in b: %v\n%s", err, out)
	}
}

// Idle connections to b's HBONE port (no TLS handshake ever) are bounded
// per pod: past MaxPendingHandshakes, new ones are reset at once and
// counted; once the idle ones go, the mesh reaches b again. Before, each
// held a goroutine and a descriptor of the node agent with no bound
// (review16 F4).
func TestPendingHandshakesBounded(t *testing.T) {
	const max = 4
	e := start(t, func(c *Config) { c.MaxPendingHandshakes = max })
	var idle []net.Conn
	refused := 0
	for range 3 * max {
		c, err := capture.NetnsByName(e.a).Dial(context.Background(), "tcp4", "10.78.0.2:15008", capture.DefaultMark)
		if isReset(err) { // the reset came before connect returned
			refused++
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	waitFor(t, "the connections past the bound refused", func() bool {
		return counter(t, e.proxyMetrics().refused, Inbound, ReasonPendingLimit) == 2*max
	})
	// Those refused were reset; the first max are still open.
	for _, c := range idle {
		_ = c.SetReadDeadline(time.Now().Add(100 * time.Millisecond))
		if _, err := c.Read(make([]byte, 1)); isReset(err) || errors.Is(err, io.EOF) {
			refused++
		}
	}
	if refused != 2*max {
		t.Errorf("%d of %d idle connections refused, want %d", refused, 3*max, 2*max)
	}
	// A real peer is refused too while the pod's bound is reached...
	if _, err := e.tryEcho("10.78.0.2:8080", 0, "x"); err == nil {
		t.Errorf("a tunnel got through while %d connections were pending", max)
	}
	// ...and served once they are gone.
	for _, c := range idle {
		_ = c.Close()
	}
	waitFor(t, "b served again", func() bool {
		got, err := e.tryEcho("10.78.0.2:8080", 0, "again")
		return err == nil && got == "again"
	})
}

// The node's open inbound tunnels are bounded: with MaxInboundTunnels
// open, a new tunnel is refused (and the client's connection reset) and
// counted; closing one lets the next through.
func TestInboundTunnelsBounded(t *testing.T) {
	const max = 2
	e := start(t, func(c *Config) { c.MaxInboundTunnels = max })
	var open []net.Conn
	for i := range max {
		c := e.dialFromA("10.78.0.2:8080", 0)
		if got, err := echo(c, "held"); err != nil || got != "held" {
			t.Fatalf("tunnel %d: %q %v", i, got, err)
		}
		open = append(open, c)
	}
	if _, err := e.tryEcho("10.78.0.2:8080", 0, "one too many"); err == nil {
		t.Errorf("tunnel %d of a node bounded at %d got through", max+1, max)
	}
	if got := counter(t, e.proxyMetrics().refused, Inbound, ReasonTunnelLimit); got != 1 {
		t.Errorf("refused{inbound,%s} = %v, want 1", ReasonTunnelLimit, got)
	}
	_ = open[0].Close()
	waitFor(t, "a tunnel again after one closed", func() bool {
		got, err := e.tryEcho("10.78.0.2:8080", 0, "next")
		return err == nil && got == "next"
	})
}

// A tunnel whose check was answered under the old policy, but which was
// not yet among the open connections when the new revision's re-check took
// its list, is asked about again. Before, it stayed open under a policy
// that denies it (review16 F6, re-check race).
func TestAdmittedDuringRecheckIsRechecked(t *testing.T) {
	e := start(t)
	entered, release := make(chan struct{}), make(chan struct{})
	var first sync.Once
	gate := func() {
		first.Do(func() { close(entered); <-release })
	}
	e.authz.gate.Store(&gate)
	c := e.dialFromA("10.78.0.2:8080", 0) // its check allows, then waits
	select {
	case <-entered:
	case <-time.After(10 * time.Second):
		t.Fatal("no check")
	}
	e.authz.deny.Store(true)
	e.setRevision("2")
	waitFor(t, "the new revision's re-check", func() bool { return e.p.recheckGen.Load() > 0 })
	close(release) // the old answer, allow, arrives after the re-check
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, _ = io.WriteString(c, "x")
	buf := make([]byte, 16)
	var err error
	for err == nil {
		_, err = c.Read(buf)
	}
	var ne net.Error
	if errors.As(err, &ne) && ne.Timeout() {
		t.Errorf("the connection admitted during the re-check is still open under the policy that denies it")
	}
}
