package hbone

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
)

// DefaultPoolIdleTimeout closes a pooled connection that carried no tunnel
// for this long.
const DefaultPoolIdleTimeout = 90 * time.Second

// PoolKey names the connections tunnels may share: one source identity, one
// destination identity, one HBONE address. Tunnels of different sources
// never share a connection, since the connection authenticates its source.
type PoolKey struct {
	Source, Peer spiffeid.ID
	Addr         string // the peer's HBONE "ip:port"
}

// Pool opens tunnels as streams on shared HBONE connections, as ztunnel
// pools per source and destination identity; a connection is opened when
// none of the key has room (its peer's stream limit) and closes after
// IdleTimeout without tunnels. No new tunnel uses a connection once either
// end's certificate has expired: it finishes its open tunnels and closes,
// and a new connection with the current SVIDs takes its place. Tunnels from a Pool have CloseWrite; their
// deadlines are refused (ErrPooledDeadline). The zero Pool is ready.
type Pool struct {
	IdleTimeout time.Duration    // default DefaultPoolIdleTimeout
	Now         func() time.Time // default time.Now

	mu     sync.Mutex
	closed bool
	conns  map[PoolKey][]*http2.ClientConn
	tls    map[*http2.ClientConn]*tls.Conn
	expiry map[*http2.ClientConn]time.Time // the earlier NotAfter of its two SVIDs
}

// ErrPoolClosed is Dial on a closed Pool.
var ErrPoolClosed = errors.New("hbone: pool closed")

// Dial opens a tunnel to cfg.Authority on a connection of key, opening one
// with dial (which connects to key.Addr, e.g. from inside the source pod's
// network namespace) when none has room. cfg.PeerID must be key.Peer and
// cfg.Cert's SVID must be key.Source's.
func (p *Pool) Dial(ctx context.Context, key PoolKey, dial func(context.Context) (net.Conn, error), cfg DialConfig) (net.Conn, error) {
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	if cfg.PeerID != key.Peer {
		return nil, fmt.Errorf("hbone: pool key names peer %s, DialConfig %s", key.Peer, cfg.PeerID)
	}
	cc, tc, err := p.reserve(key)
	if err != nil {
		return nil, err
	}
	if cc == nil {
		if cc, tc, err = p.open(ctx, key, dial, cfg); err != nil {
			return nil, err
		}
	}
	t, err := connect(ctx, cc, cfg.Authority)
	if err != nil {
		return nil, err
	}
	t.tc = tc
	return t, nil
}

// reserve returns a connection of key with a stream reserved on it, or nil.
func (p *Pool) reserve(key PoolKey) (*http2.ClientConn, *tls.Conn, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return nil, nil, ErrPoolClosed
	}
	now := time.Now
	if p.Now != nil {
		now = p.Now
	}
	live := p.conns[key][:0]
	var got *http2.ClientConn
	for _, cc := range p.conns[key] {
		if !now().Before(p.expiry[cc]) {
			// No new tunnel; the open ones finish, and Close still
			// reaches it through p.tls until it is closed.
			cc.SetDoNotReuse()
			continue
		}
		if st := cc.State(); st.Closed || st.Closing {
			continue
		}
		live = append(live, cc)
		if got == nil && cc.ReserveNewRequest() {
			got = cc
		}
	}
	if len(live) == 0 {
		delete(p.conns, key)
	} else {
		p.conns[key] = live
	}
	if got == nil {
		return nil, nil, nil
	}
	return got, p.tls[got], nil
}

// open makes a new connection for key, with a stream reserved on it, and
// pools it.
func (p *Pool) open(ctx context.Context, key PoolKey, dial func(context.Context) (net.Conn, error), cfg DialConfig) (*http2.ClientConn, *tls.Conn, error) {
	cert, err := cfg.Cert()
	if err != nil {
		return nil, nil, fmt.Errorf("hbone: source SVID: %w", err)
	}
	leaf, err := checkSource(cert.Certificate, key.Source)
	if err != nil {
		return nil, nil, err
	}
	conn, err := dial(ctx)
	if err != nil {
		return nil, nil, fmt.Errorf("hbone: connect %s: %w", key.Addr, err)
	}
	idle := p.IdleTimeout
	if idle <= 0 {
		idle = DefaultPoolIdleTimeout
	}
	tc, cc, err := handshake(ctx, conn, cfg, idle)
	if err != nil {
		return nil, nil, err
	}
	if !cc.ReserveNewRequest() {
		cc.Close()
		tc.Close()
		return nil, nil, fmt.Errorf("hbone: %s allows no stream", key.Addr)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		cc.Close()
		tc.Close()
		return nil, nil, ErrPoolClosed
	}
	if p.conns == nil {
		p.conns = map[PoolKey][]*http2.ClientConn{}
		p.tls = map[*http2.ClientConn]*tls.Conn{}
		p.expiry = map[*http2.ClientConn]time.Time{}
	}
	for old := range p.tls { // forget the connections that have closed
		if old.State().Closed {
			delete(p.tls, old)
			delete(p.expiry, old)
		}
	}
	p.conns[key] = append(p.conns[key], cc)
	p.tls[cc] = tc
	p.expiry[cc] = expiry(leaf, tc.ConnectionState())
	return cc, tc, nil
}

// expiry is when the earlier of the connection's two leaf certificates
// expires: ours (the SVID read just before the handshake; the handshake
// reads it again, never older) and the peer's.
func expiry(own *x509.Certificate, cs tls.ConnectionState) time.Time {
	t := own.NotAfter
	if len(cs.PeerCertificates) > 0 && cs.PeerCertificates[0].NotAfter.Before(t) {
		t = cs.PeerCertificates[0].NotAfter
	}
	return t
}

// checkSource refuses a certificate chain whose leaf is not source's SVID,
// so that a key never names a connection authenticated as someone else.
func checkSource(chain [][]byte, source spiffeid.ID) (*x509.Certificate, error) {
	if len(chain) == 0 {
		return nil, errors.New("hbone: source SVID is empty")
	}
	leaf, err := x509.ParseCertificate(chain[0])
	if err != nil {
		return nil, fmt.Errorf("hbone: source SVID: %w", err)
	}
	id, err := x509svid.IDFromCert(leaf)
	if err != nil {
		return nil, fmt.Errorf("hbone: source SVID: %w", err)
	}
	if id != source {
		return nil, fmt.Errorf("hbone: source SVID is %s, pool key names %s", id, source)
	}
	return leaf, nil
}

// Close closes every pooled connection and the tunnels on them.
func (p *Pool) Close() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.closed = true
	for cc, tc := range p.tls {
		cc.Close()
		tc.Close()
	}
	p.conns, p.tls, p.expiry = nil, nil, nil
	return nil
}
