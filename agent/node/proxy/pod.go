package proxy

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"net/netip"
	"strconv"
	"sync"
	"sync/atomic"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/agent/capture"
	"github.com/trustmesh/trustmesh/agent/hbone"
	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
)

// pod is one captured local workload.
type pod struct {
	p      *Proxy
	netns  capture.Netns
	w      atomic.Pointer[workload]
	cancel context.CancelFunc
	wg     sync.WaitGroup

	// tproxy: inbound connections reach the application from the remote
	// pod's address (capture's TPROXY rules), else from the pod's own.
	tproxy bool
	// pool carries the pod's outbound tunnels; per pod, since a tunnel's
	// connection is opened from the source pod's address.
	pool *hbone.Pool

	mu    sync.Mutex
	conns map[*inboundConn]struct{}
}

// set updates the pod's workload; open connections stay. It reports
// whether what a policy selects by (labels, identity) changed.
func (pd *pod) set(w *workload) bool {
	old := pd.w.Swap(w)
	return old == nil || old.id != w.id || !maps.Equal(old.msg.GetLabels(), w.msg.GetLabels())
}

// current is ic's check with its workload's identity and labels of now.
func (ic *inboundConn) current() check {
	c := ic.check
	w := ic.pd.w.Load()
	c.dest, c.destLabels = w.id, w.msg.GetLabels()
	return c
}

func (pd *pod) inbound() []*inboundConn {
	pd.mu.Lock()
	defer pd.mu.Unlock()
	out := make([]*inboundConn, 0, len(pd.conns))
	for c := range pd.conns {
		out = append(out, c)
	}
	return out
}

// stop closes the pod's listeners; open connections are left to end.
func (pd *pod) stop() {
	pd.cancel()
	pd.wg.Wait()
	pd.p.m.pods.WithLabelValues(pd.sourceMode()).Dec()
}

func (p *Proxy) netnsOf(w *workload) (capture.Netns, error) {
	if p.cfg.Kubernetes {
		return capture.PodNetns(p.cfg.ProcRoot, w.msg.GetUid())
	}
	ns := w.msg.GetNetns()
	switch {
	case ns == "":
		return capture.Netns{}, errors.New("the workload names no network namespace (netns)")
	case ns[0] == '/':
		return capture.Netns{Path: ns}, nil
	default:
		return capture.NetnsByName(ns), nil
	}
}

// setup captures w: its namespace, the rules, the three listeners.
func (p *Proxy) setup(ctx context.Context, w *workload) (*pod, error) {
	if len(w.addrs) == 0 {
		return nil, errors.New("the workload has no address yet")
	}
	ns, err := p.netnsOf(w)
	if err != nil {
		return nil, err
	}
	r := p.cfg.Rules
	// IPv6 is captured wherever the namespace has it, whatever addresses
	// the mesh lists: a pod listed with IPv4 alone still has link-local
	// IPv6 (and maybe more), which would otherwise reach its applications
	// in plaintext. A namespace without IPv6 gets the IPv4 rules alone.
	v6, v6Disabled, err := capture.IPv6(ns)
	if err != nil {
		return nil, err
	}
	r.IPv6 = v6
	for _, a := range w.addrs {
		if a.Is6() && !v6 {
			return nil, fmt.Errorf("the workload has the IPv6 address %s but its network namespace %s has no IPv6", a, ns.Path)
		}
	}
	// TPROXY needs a local IPv6 route on lo, which a namespace with IPv6
	// disabled refuses: such a pod is captured with REDIRECT.
	r.TPROXY = !v6Disabled && p.canTPROXY(ctx, ns, r.IPv6)
	// Listeners first, so that no captured connection finds no one.
	var ls []net.Listener
	closeAll := func() {
		for _, l := range ls {
			_ = l.Close()
		}
	}
	for _, port := range []uint16{r.Outbound, r.InboundPlaintext, r.HBONE} {
		// TPROXY delivers inbound plaintext to a transparent socket.
		l, err := listen(ctx, ns, port, r.IPv6, p.cfg.Rules.Mark, r.TPROXY && port == r.InboundPlaintext)
		if err != nil {
			closeAll()
			return nil, err
		}
		ls = append(ls, l)
	}
	if err := capture.Install(ctx, ns, r); err != nil {
		closeAll()
		return nil, err
	}
	pctx, cancel := context.WithCancel(context.Background())
	pd := &pod{p: p, netns: ns, cancel: cancel, conns: map[*inboundConn]struct{}{}, tproxy: r.TPROXY, pool: &hbone.Pool{}}
	pd.set(w)
	p.m.pods.WithLabelValues(pd.sourceMode()).Inc()
	pd.wg.Add(4)
	go func() { defer pd.wg.Done(); <-pctx.Done(); closeAll() }()
	go func() { defer pd.wg.Done(); pd.acceptLoop(pctx, ls[0], pd.outbound) }()
	go func() { defer pd.wg.Done(); pd.acceptLoop(pctx, ls[1], pd.plaintext) }()
	go func() { defer pd.wg.Done(); pd.serveHBONE(pctx, ls[2]) }()
	return pd, nil
}

func listen(ctx context.Context, ns capture.Netns, port uint16, v6 bool, mark int, transparent bool) (net.Listener, error) {
	p := strconv.Itoa(int(port))
	network, addr := "tcp4", "0.0.0.0:"+p
	if v6 {
		network, addr = "tcp", "[::]:"+p
	}
	if transparent {
		return ns.ListenTransparent(ctx, network, addr, mark)
	}
	return ns.Listen(ctx, network, addr, mark)
}

// probeTPROXY is capture.ProbeTPROXY (tests replace it).
var probeTPROXY = capture.ProbeTPROXY

// canTPROXY reports whether TPROXY works in ns (for IPv6 too with v6). The
// answer is the kernel's, so it is asked once per address family set and
// kept; when it is no, the proxy says so once and uses REDIRECT, with which
// applications see connections from their own pod's address.
func (p *Proxy) canTPROXY(ctx context.Context, ns capture.Netns, v6 bool) bool {
	p.tproxyMu.Lock()
	defer p.tproxyMu.Unlock()
	if ok, known := p.tproxy[v6]; known {
		return ok
	}
	err := probeTPROXY(ctx, ns, v6)
	if ctx.Err() != nil {
		return false // not an answer; asked again next time
	}
	p.tproxy[v6] = err == nil
	if err != nil {
		p.log.Warn("TPROXY is not usable here: inbound connections reach applications from their own pod's address, not the remote pod's (REDIRECT)", "ipv6", v6, "error", err)
	} else {
		p.log.Info("inbound connections keep their source address (TPROXY)", "ipv6", v6)
	}
	return err == nil
}

// sourceMode is the pods metric's inbound_source of pd.
func (pd *pod) sourceMode() string {
	if pd.tproxy {
		return SourceTPROXY
	}
	return SourceRedirect
}

// dialApp connects to the application at dst from inside the pod: with
// TPROXY from the remote peer's address, so that the application sees
// where the connection comes from.
func (pd *pod) dialApp(ctx context.Context, remote net.Addr, dst netip.AddrPort) (net.Conn, error) {
	mark := pd.p.cfg.Rules.Mark
	if src := addrPort(remote).Addr().Unmap(); pd.tproxy && src.IsValid() && src.Is4() == dst.Addr().Is4() {
		return pd.netns.DialTransparent(ctx, "tcp", src, dst, mark)
	}
	return pd.netns.Dial(ctx, "tcp", dst.String(), mark)
}

func (pd *pod) acceptLoop(ctx context.Context, l net.Listener, handle func(context.Context, *net.TCPConn)) {
	for {
		c, err := l.Accept()
		if err != nil {
			if ctx.Err() == nil {
				pd.p.log.Warn("a pod listener failed", "listener", l.Addr(), "netns", pd.netns.Path, "error", err)
			}
			return
		}
		go handle(ctx, c.(*net.TCPConn))
	}
}

// reset closes c with an RST.
func reset(c net.Conn) {
	if t, ok := c.(*net.TCPConn); ok {
		_ = t.SetLinger(0)
	}
	_ = c.Close()
}

// plaintext refuses inbound plaintext at once: trustmesh is STRICT.
func (pd *pod) plaintext(_ context.Context, c *net.TCPConn) {
	dst, _ := capture.OriginalDst(c)
	pd.p.m.refused.WithLabelValues(InboundPlaintext, "strict").Inc()
	pd.p.log.Info("refused inbound plaintext (STRICT mTLS: use the mesh)", "workload", pd.w.Load().msg.GetUid(), "source", c.RemoteAddr(), "destination", dst)
	reset(c)
}

func (p *Proxy) certFor(id spiffeid.ID) func() (*tls.Certificate, error) {
	return func() (*tls.Certificate, error) {
		st := p.cfg.Identities.Store(id)
		if st == nil {
			return nil, fmt.Errorf("the node holds no SVID for %s (yet)", id)
		}
		snap, _ := st.Load()
		if snap.SVID == nil {
			return nil, fmt.Errorf("the node holds no SVID for %s (yet)", id)
		}
		s := snap.SVID
		der := make([][]byte, len(s.Certificates))
		for i, c := range s.Certificates {
			der[i] = c.Raw
		}
		return &tls.Certificate{Certificate: der, PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}, nil
	}
}

// outbound carries a connection the pod made.
func (pd *pod) outbound(ctx context.Context, c *net.TCPConn) {
	p := pd.p
	src := pd.w.Load()
	dst, err := capture.OriginalDst(c)
	if err != nil {
		p.m.refused.WithLabelValues(Outbound, "original_destination").Inc()
		p.log.Warn("outbound connection without an original destination", "workload", src.msg.GetUid(), "error", err)
		reset(c)
		return
	}
	dst = netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port())
	if p.proxyPort(dst.Port()) {
		// A connection to a proxy port (a peer's, or this pod's own, which
		// reaches the listener uncaptured over lo) would be carried into a
		// proxy listener again: a loop, or a tunnel in a tunnel.
		p.m.refused.WithLabelValues(Outbound, "proxy_port").Inc()
		p.log.Info("refused an outbound connection to a node proxy port", "workload", src.msg.GetUid(), "destination", dst)
		reset(c)
		return
	}
	// Connecting and the handshake are bounded; the tunnel outlives ctx.
	ctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
	defer cancel()
	dest := p.current().byAddr[dst.Addr()]
	if dest == nil || dest.msg.GetMode() == ambientv1.DataPlaneMode_DATA_PLANE_MODE_NONE {
		// Not in the mesh: plain TCP, as the pod would have without the proxy.
		up, err := pd.netns.Dial(ctx, "tcp", dst.String(), p.cfg.Rules.Mark)
		if err != nil {
			p.m.refused.WithLabelValues(Outbound, "dial").Inc()
			p.log.Info("outbound passthrough failed", "workload", src.msg.GetUid(), "destination", dst, "error", err)
			reset(c)
			return
		}
		p.carry(Outbound, c, up, nil)
		return
	}
	hp := netip.AddrPortFrom(dst.Addr(), ambientv1.HBONEPort)
	// Tunnels share a connection per source and destination identity and
	// address (hbone.Pool), opened from this pod's namespace, marked.
	var dialErr error
	t, err := pd.pool.Dial(ctx, hbone.PoolKey{Source: src.id, Peer: dest.id, Addr: hp.String()},
		func(ctx context.Context) (net.Conn, error) {
			raw, err := pd.netns.Dial(ctx, "tcp", hp.String(), p.cfg.Rules.Mark)
			dialErr = err
			return raw, err
		},
		hbone.DialConfig{Cert: p.certFor(src.id), Bundle: p.cfg.Bundle, PeerID: dest.id, Authority: dst.String()})
	if err != nil {
		reason := "refused"
		var st *hbone.StatusError
		switch {
		case dialErr != nil:
			reason = "dial"
		case errors.Is(err, hbone.ErrHandshake):
			reason = "handshake"
			p.m.handshake.WithLabelValues(Outbound).Inc()
		case errors.As(err, &st) && st.Code == 403:
			reason = "denied"
		}
		p.m.refused.WithLabelValues(Outbound, reason).Inc()
		p.log.Info("outbound HBONE tunnel refused", "source", src.id, "destination", dst, "want", dest.id, "error", err)
		reset(c)
		return
	}
	p.carry(Outbound, c, t, nil)
}

// inboundConn is an open inbound connection, re-checked on policy change
// and when its workload's labels or identity change.
type inboundConn struct {
	pd    *pod
	check check
	once  sync.Once
	why   atomic.Value // string: why the proxy closed it
	t     net.Conn
	app   net.Conn
}

func (ic *inboundConn) kill(reason string) {
	ic.once.Do(func() {
		ic.why.Store(reason)
		reset(ic.app)
		_ = ic.t.Close()
	})
}

func (pd *pod) checkFor(peer spiffeid.ID, authority string, remote net.Addr) (check, error) {
	w := pd.w.Load()
	ap, err := netip.ParseAddrPort(authority)
	if err != nil {
		return check{}, fmt.Errorf("authority %q: %w", authority, err)
	}
	ap = netip.AddrPortFrom(ap.Addr().Unmap(), ap.Port())
	if !w.has(ap.Addr()) {
		return check{}, fmt.Errorf("authority %s is not an address of %s", authority, w.msg.GetUid())
	}
	if pd.p.proxyPort(ap.Port()) {
		// The proxy's own listeners: a tunnel to 15001 would loop through
		// it, one to 15008 would carry a tunnel inside the tunnel whose
		// check sees this pod as the source. Refused, as ztunnel does.
		return check{}, fmt.Errorf("authority %s: port %d is the node proxy's own", authority, ap.Port())
	}
	return check{source: peer, sourceAddr: addrPort(remote), dest: w.id, destLabels: w.msg.GetLabels(), destination: ap}, nil
}

// proxyPort reports whether port is one of the node proxy's own (the
// configured ones and ambientv1's), which no connection may be carried to.
func (p *Proxy) proxyPort(port uint16) bool {
	r := p.cfg.Rules
	switch port {
	case r.Outbound, r.InboundPlaintext, r.HBONE,
		ambientv1.OutboundPort, ambientv1.InboundPlaintextPort, ambientv1.HBONEPort:
		return true
	}
	return false
}

func (pd *pod) serveHBONE(ctx context.Context, raw net.Listener) {
	p := pd.p
	l := newPendingListener(raw, p.cfg.MaxPendingHandshakes, func(remote net.Addr) {
		p.m.refused.WithLabelValues(Inbound, ReasonPendingLimit).Inc()
		p.log.Warn("refused an inbound HBONE connection: the pod has too many connections not carrying a tunnel yet", "remote", remote, "workload", pd.w.Load().msg.GetUid(), "max", p.cfg.MaxPendingHandshakes)
	})
	err := hbone.Serve(ctx, l, hbone.ServerConfig{
		Cert: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			return p.certFor(pd.w.Load().id)()
		},
		Bundle: p.cfg.Bundle,
		Accept: func(ctx context.Context, peer spiffeid.ID, authority string, remote net.Addr) error {
			if n := p.inboundOpen.Load(); n >= int64(p.cfg.MaxInboundTunnels) {
				p.m.refused.WithLabelValues(Inbound, ReasonTunnelLimit).Inc()
				p.log.Warn("refused an inbound HBONE tunnel: the node has too many open", "source", peer, "remote", remote, "max", p.cfg.MaxInboundTunnels)
				return fmt.Errorf("the node has %d inbound tunnels open, its most", n)
			}
			gen := p.recheckGen.Load()
			c, err := pd.checkFor(peer, authority, remote)
			if err != nil {
				p.m.refused.WithLabelValues(Inbound, "authority").Inc()
				p.log.Info("inbound HBONE refused", "source", peer, "remote", remote, "error", err)
				return err
			}
			if err := p.authorize(ctx, c); err != nil {
				reason := "authz_error"
				var d *deniedError
				if errors.As(err, &d) {
					reason = "denied"
				}
				p.m.refused.WithLabelValues(Inbound, reason).Inc()
				p.log.Info("inbound HBONE refused", "source", peer, "remote", remote, "destination", c.destination, "error", err)
				return err
			}
			// Only a tunnel let through settles its connection: one whose
			// every CONNECT is refused stays pending, and counted, until
			// it closes.
			l.settled(remote)
			// Handle runs next with the same ctx (agent/hbone).
			p.admitted.Store(ctx, gen)
			context.AfterFunc(ctx, func() { p.admitted.Delete(ctx) })
			return nil
		},
		Handle: func(ctx context.Context, t *hbone.Tunnel) {
			p.inboundOpen.Add(1)
			defer p.inboundOpen.Add(-1)
			c, err := pd.checkFor(t.Peer, t.Authority, t.Remote)
			if err != nil { // Accept checked it; the workload changed since
				p.m.refused.WithLabelValues(Inbound, "authority").Inc()
				_ = t.Close()
				return
			}
			dctx, cancel := context.WithTimeout(ctx, p.cfg.ConnectTimeout)
			app, err := pd.dialApp(dctx, t.Remote, c.destination)
			cancel()
			if err != nil {
				p.m.refused.WithLabelValues(Inbound, "dial").Inc()
				p.log.Info("cannot reach the application", "destination", c.destination, "error", err)
				_ = t.Close()
				return
			}
			ic := &inboundConn{pd: pd, check: c, t: t, app: app}
			pd.mu.Lock()
			pd.conns[ic] = struct{}{}
			pd.mu.Unlock()
			if gen, ok := p.admitted.LoadAndDelete(ctx); ok && gen.(uint64) != p.recheckGen.Load() {
				// A re-check began after this tunnel's check and may have
				// missed it (it was not in pd.conns yet): ask again.
				go p.recheck(ctx, "admitted while the policy or workload changed", []*inboundConn{ic})
			}
			p.carry(Inbound, app, t, ic)
			pd.mu.Lock()
			delete(pd.conns, ic)
			pd.mu.Unlock()
		},
		HandshakeFailed: func(remote net.Addr, err error) {
			p.m.handshake.WithLabelValues(Inbound).Inc()
			p.m.refused.WithLabelValues(Inbound, "handshake").Inc()
			p.log.Info("inbound HBONE handshake failed", "remote", remote, "error", err)
		},
	})
	if err != nil && ctx.Err() == nil {
		p.log.Warn("the HBONE server of a pod stopped", "netns", pd.netns.Path, "error", err)
	}
}

type closeWriter interface{ CloseWrite() error }

// carry splices a (the pod's side) and b both ways with half-close, then
// closes both. ic, for inbound, may be killed meanwhile.
func (p *Proxy) carry(dir string, a, b net.Conn, ic *inboundConn) {
	p.m.opened.WithLabelValues(dir).Inc()
	bytes := p.m.bytes.WithLabelValues(dir)
	var failed, ended atomic.Bool
	var wg sync.WaitGroup
	pipe := func(dst, src net.Conn) {
		defer wg.Done()
		n, err := io.Copy(dst, src)
		bytes.Add(float64(n))
		if err != nil {
			if ended.Load() { // dst's Close below ended this copy
				return
			}
			failed.Store(true)
			reset(a)
			_ = b.Close()
			return
		}
		if cw, ok := dst.(closeWriter); ok {
			_ = cw.CloseWrite()
			return
		}
		// A server-side tunnel cannot end its half alone (agent/hbone):
		// Close gives the peer everything written and then io.EOF. Without
		// it, an application that answers and closes first (a banner, a
		// close-delimited response) would leave the client waiting.
		ended.Store(true)
		_ = dst.Close()
	}
	wg.Add(2)
	go pipe(b, a)
	go pipe(a, b)
	wg.Wait()
	reason := "done"
	if ic != nil {
		ic.once.Do(func() {}) // no kill after this point
		if why, ok := ic.why.Load().(string); ok {
			reason = why
		}
	}
	if reason == "done" && failed.Load() {
		reason = "error"
	}
	_ = a.Close()
	_ = b.Close()
	p.m.closed.WithLabelValues(dir, reason).Inc()
}
