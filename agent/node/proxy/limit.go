package proxy

import (
	"net"
	"sync"
)

// Defaults of Config's bounds on inbound HBONE.
const (
	// DefaultMaxPendingHandshakes bounds, per pod, the connections to its
	// HBONE port that have not carried a tunnel yet: anyone who can reach
	// the port can open them, and each holds a goroutine and a descriptor
	// of the node agent for up to the handshake timeout.
	DefaultMaxPendingHandshakes = 128
	// DefaultMaxInboundTunnels bounds the inbound tunnels open at once on
	// the node, over all its pods.
	DefaultMaxInboundTunnels = 16384
	// maxPendingPerSource bounds, per pod, the pending connections from
	// one source address, so that one host cannot take all of a pod's
	// pending slots and lock its real peers out.
	maxPendingPerSource = 16
)

// Reasons of trustmesh_node_proxy_connections_refused_total{direction="inbound"}
// for the bounds.
const (
	ReasonPendingLimit = "pending_limit" // the pod's pending handshakes are at MaxPendingHandshakes
	ReasonTunnelLimit  = "tunnel_limit"  // the node's open inbound tunnels are at MaxInboundTunnels
)

// pendingListener resets a new connection while max connections that have
// carried no tunnel yet (a TLS handshake in progress, or an HBONE
// connection none of whose tunnels was let through) are open, or
// maxPendingPerSource of them from its source address.
type pendingListener struct {
	net.Listener
	max     int
	refused func(remote net.Addr)

	mu      sync.Mutex
	pending map[string]*pendingConn // by remote address
}

func newPendingListener(l net.Listener, max int, refused func(net.Addr)) *pendingListener {
	return &pendingListener{Listener: l, max: max, refused: refused, pending: map[string]*pendingConn{}}
}

func (l *pendingListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		key := c.RemoteAddr().String()
		l.mu.Lock()
		if len(l.pending) >= l.max || l.fromSource(c.RemoteAddr()) >= maxPendingPerSource {
			l.mu.Unlock()
			l.refused(c.RemoteAddr())
			reset(c)
			continue
		}
		pc := &pendingConn{Conn: c, l: l, key: key}
		l.pending[key] = pc
		l.mu.Unlock()
		return pc, nil
	}
}

// fromSource counts the pending connections from remote's IP address;
// l.mu is held.
func (l *pendingListener) fromSource(remote net.Addr) int {
	ip := addrPort(remote).Addr()
	n := 0
	for _, pc := range l.pending {
		if addrPort(pc.RemoteAddr()).Addr() == ip {
			n++
		}
	}
	return n
}

// settled tells that the connection from remote was let through a tunnel:
// it is authenticated, authorized and no longer pending.
func (l *pendingListener) settled(remote net.Addr) {
	l.mu.Lock()
	defer l.mu.Unlock()
	delete(l.pending, remote.String())
}

type pendingConn struct {
	net.Conn
	l    *pendingListener
	key  string
	once sync.Once
}

func (c *pendingConn) Close() error {
	c.once.Do(func() {
		c.l.mu.Lock()
		if c.l.pending[c.key] == c {
			delete(c.l.pending, c.key)
		}
		c.l.mu.Unlock()
	})
	return c.Conn.Close()
}
