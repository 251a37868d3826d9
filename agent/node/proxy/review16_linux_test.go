package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/agent/capture"
	"github.com/trustmesh/trustmesh/agent/hbone"
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
