package hbone

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// countingDialer dials addr and counts the connections it opened.
type countingDialer struct {
	addr string
	n    atomic.Int32
}

func (d *countingDialer) dial(ctx context.Context) (net.Conn, error) {
	d.n.Add(1)
	var nd net.Dialer
	return nd.DialContext(ctx, "tcp", d.addr)
}

func echoOnce(t *testing.T, c net.Conn, msg string) {
	t.Helper()
	if _, err := io.WriteString(c, msg); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(msg))
	if _, err := io.ReadFull(c, got); err != nil || string(got) != msg {
		t.Fatalf("echo %q, %v, want %q", got, err, msg)
	}
}

func TestPoolSharesAConnectionPerKey(t *testing.T) {
	e := newEnv(t)
	d := &countingDialer{addr: serve(t, e.serverConfig())}
	p := &Pool{}
	defer p.Close()
	key := PoolKey{Source: srcID, Peer: dstID, Addr: d.addr}

	var tunnels []net.Conn
	for i := range 5 {
		c, err := p.Dial(context.Background(), key, d.dial, e.dialConfig(fmt.Sprintf("10.0.0.%d:80", i+1)))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		tunnels = append(tunnels, c)
	}
	if n := d.n.Load(); n != 1 {
		t.Fatalf("5 tunnels of one key opened %d connections, want 1", n)
	}
	// Each tunnel is its own byte stream; closing one leaves the others.
	var wg sync.WaitGroup
	for i, c := range tunnels {
		wg.Go(func() { echoOnce(t, c, fmt.Sprintf("tunnel %d", i)) })
	}
	wg.Wait()
	tunnels[0].Close()
	echoOnce(t, tunnels[1], "still here")
	if err := tunnels[1].(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if rest, err := io.ReadAll(tunnels[1]); err != nil || len(rest) != 0 {
		t.Errorf("after CloseWrite: %q, %v, want io.EOF", rest, err)
	}
	echoOnce(t, tunnels[2], "others unaffected")
	if err := tunnels[2].SetDeadline(time.Now()); !errors.Is(err, ErrPooledDeadline) {
		t.Errorf("SetDeadline on a pooled tunnel: %v, want ErrPooledDeadline", err)
	}

	// Another source never shares the connection.
	other := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/other")
	otherCert := tlsCert(e.ca.SVID(t, other, time.Now().Add(-time.Minute), time.Hour))
	cfg := e.dialConfig("10.0.0.1:80")
	cfg.Cert = func() (*tls.Certificate, error) { return otherCert, nil }
	c, err := p.Dial(context.Background(), PoolKey{Source: other, Peer: dstID, Addr: d.addr}, d.dial, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	echoOnce(t, c, "other source")
	if n := d.n.Load(); n != 2 {
		t.Errorf("a second source opened %d connections in all, want 2", n)
	}
}

func TestPoolOpensAnotherConnectionWhenFull(t *testing.T) {
	e := newEnv(t)
	cfg := e.serverConfig()
	cfg.MaxConcurrentStreams = 2
	d := &countingDialer{addr: serve(t, cfg)}
	p := &Pool{}
	defer p.Close()
	key := PoolKey{Source: srcID, Peer: dstID, Addr: d.addr}
	for i := range 5 {
		c, err := p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80"))
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		echoOnce(t, c, fmt.Sprint(i))
	}
	if n := d.n.Load(); n != 3 {
		t.Errorf("5 tunnels at 2 streams per connection opened %d connections, want 3", n)
	}
}

func TestPoolRefusesAKeyThatIsNotTheConfig(t *testing.T) {
	e := newEnv(t)
	d := &countingDialer{addr: serve(t, e.serverConfig())}
	p := &Pool{}
	defer p.Close()
	impostor := spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/impostor")
	for name, key := range map[string]PoolKey{
		"source is not the SVID's": {Source: impostor, Peer: dstID, Addr: d.addr},
		"peer is not PeerID":       {Source: srcID, Peer: impostor, Addr: d.addr},
	} {
		if c, err := p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80")); err == nil {
			c.Close()
			t.Errorf("%s: Dial succeeded", name)
		}
	}
	if n := d.n.Load(); n != 0 {
		t.Errorf("refused keys opened %d connections", n)
	}
}

// TestPoolReplacesClosedConnections: an idle connection closes, and the
// next tunnel opens a new one instead of failing on the dead one.
func TestPoolReplacesClosedConnections(t *testing.T) {
	e := newEnv(t)
	d := &countingDialer{addr: serve(t, e.serverConfig())}
	p := &Pool{IdleTimeout: 50 * time.Millisecond}
	defer p.Close()
	key := PoolKey{Source: srcID, Peer: dstID, Addr: d.addr}
	c, err := p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80"))
	if err != nil {
		t.Fatal(err)
	}
	echoOnce(t, c, "first")
	c.Close()
	deadline := time.Now().Add(5 * time.Second)
	for {
		p.mu.Lock()
		cc := p.conns[key][0]
		p.mu.Unlock()
		if cc.State().Closed {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("idle connection not closed")
		}
		time.Sleep(20 * time.Millisecond)
	}
	c, err = p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80"))
	if err != nil {
		t.Fatalf("Dial after the pooled connection closed: %v", err)
	}
	defer c.Close()
	echoOnce(t, c, "second")
	if n := d.n.Load(); n != 2 {
		t.Errorf("opened %d connections, want 2", n)
	}
	p.mu.Lock()
	held := len(p.conns[key])
	p.mu.Unlock()
	if held != 1 {
		t.Errorf("pool holds %d connections of the key, want the live one only", held)
	}
}

func TestPoolClose(t *testing.T) {
	e := newEnv(t)
	d := &countingDialer{addr: serve(t, e.serverConfig())}
	p := &Pool{}
	key := PoolKey{Source: srcID, Peer: dstID, Addr: d.addr}
	c, err := p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	p.Close()
	if _, err := io.ReadAll(c); err == nil {
		t.Error("tunnel ended cleanly by Pool.Close, want an error")
	}
	if _, err := p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80")); !errors.Is(err, ErrPoolClosed) {
		t.Errorf("Dial on a closed pool: %v", err)
	}
}

// TestPoolRetiresConnectionsPastTheirCertificates: once a pooled
// connection's SVIDs have expired, new tunnels get a new connection; the
// tunnels already open on the old one carry on, and it closes after them.
func TestPoolRetiresConnectionsPastTheirCertificates(t *testing.T) {
	e := newEnv(t) // SVIDs valid from a minute ago for an hour
	d := &countingDialer{addr: serve(t, e.serverConfig())}
	var mu sync.Mutex
	now := time.Now()
	p := &Pool{Now: func() time.Time { mu.Lock(); defer mu.Unlock(); return now }}
	defer p.Close()
	key := PoolKey{Source: srcID, Peer: dstID, Addr: d.addr}
	old, err := p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80"))
	if err != nil {
		t.Fatal(err)
	}
	defer old.Close()
	p.mu.Lock()
	oldCC := p.conns[key][0]
	p.mu.Unlock()

	mu.Lock()
	now = now.Add(58 * time.Minute)
	mu.Unlock()
	c, err := p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80"))
	if err != nil {
		t.Fatal(err)
	}
	c.Close()
	if n := d.n.Load(); n != 1 {
		t.Fatalf("a connection within its certificates' life was replaced (%d connections)", n)
	}

	mu.Lock()
	now = now.Add(time.Minute)
	mu.Unlock()
	c, err = p.Dial(context.Background(), key, d.dial, e.dialConfig("10.0.0.1:80"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if n := d.n.Load(); n != 2 {
		t.Fatalf("%d connections, want a new one past the certificates' expiry", n)
	}
	echoOnce(t, old, "the open tunnel carries on")
	old.Close()
	deadline := time.Now().Add(5 * time.Second)
	for !oldCC.State().Closed {
		if time.Now().After(deadline) {
			t.Fatal("the retired connection stayed open after its last tunnel")
		}
		time.Sleep(10 * time.Millisecond)
	}
	echoOnce(t, c, "the new one works")
}
