package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"net"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/agent/capture"
	"github.com/trustmesh/trustmesh/agent/hbone"
)

// An authenticated peer whose CONNECTs are all refused keeps its HTTP/2
// connection open (a pool does): it must stay counted as pending, so that
// such connections cannot pile up past the pod's bound (review2 of
// issue 16: they left the pending set at their first, refused, CONNECT
// and were then bounded by nothing but the idle timeout).
func TestRefusedTunnelsKeepTheirConnectionPending(t *testing.T) {
	const max = 4
	e := start(t, func(c *Config) { c.MaxPendingHandshakes = max })
	var pools []*hbone.Pool
	t.Cleanup(func() {
		for _, p := range pools {
			_ = p.Close()
		}
	})
	held := 0
	for i := range 3 * max {
		p := &hbone.Pool{}
		pools = append(pools, p)
		cfg := hbone.DialConfig{
			Cert:   func() (*tls.Certificate, error) { return certOf(e.ids, e.idA) },
			Bundle: e.ca.Bundle(), PeerID: e.idB,
			Authority: "10.78.0.2:15001", // the proxy's own port: always refused
		}
		key := hbone.PoolKey{Source: e.idA, Peer: e.idB, Addr: "10.78.0.2:15008"}
		dial := func(ctx context.Context) (net.Conn, error) {
			return capture.NetnsByName(e.a).Dial(ctx, "tcp4", "10.78.0.2:15008", capture.DefaultMark)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_, err := p.Dial(ctx, key, dial, cfg)
		cancel()
		var st *hbone.StatusError
		if errors.As(err, &st) {
			held++ // the TLS connection was accepted and its CONNECT answered
		} else {
			t.Logf("connection %d: %v", i, err)
		}
	}
	if held > max {
		t.Errorf("%d connections with only refused tunnels were accepted and kept, past the pod's bound of %d", held, max)
	}
	if held == 0 {
		t.Fatal("no connection was accepted at all; the test shows nothing")
	}
}

// One source address gets at most maxPendingPerSource of a pod's pending
// slots, so a single host holding idle connections cannot take them all
// (review2 of issue 16: with only the per-pod bound, 128 idle connections
// from anywhere locked a pod's real peers out).
func TestPendingConnectionsBoundedPerSource(t *testing.T) {
	e := start(t) // the per-pod bound stays at its default, far above
	var idle []net.Conn
	t.Cleanup(func() {
		for _, c := range idle {
			_ = c.Close()
		}
	})
	for range maxPendingPerSource + 4 {
		c, err := capture.NetnsByName(e.a).Dial(context.Background(), "tcp4", "10.78.0.2:15008", capture.DefaultMark)
		if err == nil {
			idle = append(idle, c)
		}
	}
	waitFor(t, "the connections past the per-source bound refused", func() bool {
		return counter(t, e.proxyMetrics().refused, Inbound, ReasonPendingLimit) == 4
	})
}
