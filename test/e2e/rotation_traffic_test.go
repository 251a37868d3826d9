package e2e

// The rotation suite's workloads and what it records about them:
//
//   - two workloads, each with a go-spiffe X509Source on its own agent's
//     socket, talk mTLS: a server, and a client that opens a new
//     connection (a full handshake, never resumed) and echoes a line over
//     it, again and again;
//   - both sides verify the peer with go-spiffe's tlsconfig against the
//     bundle their agent serves, and handshakeLog checks, at the moment of
//     verification, every certificate of the peer's chain and the root it
//     verified to against NotBefore <= now < NotAfter, and records which
//     leaves, intermediates and roots were presented;
//   - bundleLog polls both workloads' bundles and records when each root
//     came and went.

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"sort"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
)

// exchangeTimeout bounds one connection, handshake and echo. It is long:
// a slow handshake on a loaded machine is not a failed one.
const exchangeTimeout = 30 * time.Second

// x509Source opens a workload's go-spiffe source on an agent's socket and
// waits for its first SVID.
func x509Source(t testing.TB, socketPath string) *workloadapi.X509Source {
	t.Helper()
	waitFor(t, func() bool { _, err := net.Dial("unix", socketPath); return err == nil }, "the agent's socket")
	ctx, cancel := context.WithTimeout(context.Background(), exchangeTimeout)
	defer cancel()
	src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+socketPath)))
	if err != nil {
		t.Fatalf("X509 source on %s: %v", socketPath, err)
	}
	t.Cleanup(func() { src.Close() })
	return src
}

// seenCert is a CA certificate seen in verified peer chains.
type seenCert struct {
	cert        *x509.Certificate
	root        string // for an intermediate, the serial of its root
	first, last time.Time
	count       int
}

// handshakeLog is what the workloads saw.
type handshakeLog struct {
	mu        sync.Mutex
	exchanges int
	lastOK    time.Time
	maxGap    time.Duration
	failures  []string
	expired   []string
	inters    map[string]*seenCert
	roots     map[string]*seenCert
	leaves    map[spiffeid.ID]map[string]*x509.Certificate
	verified  map[string]int // by side
}

func newHandshakeLog() *handshakeLog {
	return &handshakeLog{
		inters: map[string]*seenCert{}, roots: map[string]*seenCert{},
		leaves: map[spiffeid.ID]map[string]*x509.Certificate{}, verified: map[string]int{},
	}
}

// hook makes cfg record every peer chain before go-spiffe verifies it.
func (l *handshakeLog) hook(cfg *tls.Config, side string, bundle x509bundle.Source) *tls.Config {
	verify := cfg.VerifyPeerCertificate
	cfg.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
		l.observe(side, raw, bundle, time.Now())
		return verify(raw, chains)
	}
	return cfg
}

func inWindow(c *x509.Certificate, now time.Time) bool {
	return !now.Before(c.NotBefore) && now.Before(c.NotAfter)
}

func describe(c *x509.Certificate) string {
	return fmt.Sprintf("%q serial %s valid %s to %s", c.Subject.CommonName, c.SerialNumber.Text(16),
		c.NotBefore.Format(time.RFC3339Nano), c.NotAfter.Format(time.RFC3339Nano))
}

// observe checks one peer chain at now, as presented and as verified to a
// root of the bundle.
func (l *handshakeLog) observe(side string, raw [][]byte, bundle x509bundle.Source, now time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	certs := make([]*x509.Certificate, 0, len(raw))
	for _, der := range raw {
		c, err := x509.ParseCertificate(der)
		if err != nil {
			l.failures = append(l.failures, fmt.Sprintf("%s %s: peer sent an unparsable certificate: %v", now.Format(time.RFC3339Nano), side, err))
			return
		}
		certs = append(certs, c)
	}
	for i, c := range certs {
		if !inWindow(c, now) {
			l.expired = append(l.expired, fmt.Sprintf("%s %s: peer chain[%d] %s", now.Format(time.RFC3339Nano), side, i, describe(c)))
		}
	}
	if len(certs) == 0 {
		return
	}
	id, chains, err := x509svid.Verify(certs, bundle)
	if err != nil {
		return // go-spiffe refuses it too, and the exchange fails
	}
	l.verified[side]++
	anchor := chains[0][len(chains[0])-1]
	if !inWindow(anchor, now) {
		l.expired = append(l.expired, fmt.Sprintf("%s %s: peer chain's root %s", now.Format(time.RFC3339Nano), side, describe(anchor)))
	}
	note := func(m map[string]*seenCert, c *x509.Certificate, root string) {
		k := c.SerialNumber.Text(16)
		s := m[k]
		if s == nil {
			s = &seenCert{cert: c, root: root, first: now}
			m[k] = s
		}
		s.last = now
		s.count++
	}
	note(l.roots, anchor, "")
	for _, c := range certs[1:] {
		note(l.inters, c, anchor.SerialNumber.Text(16))
	}
	if l.leaves[id] == nil {
		l.leaves[id] = map[string]*x509.Certificate{}
	}
	l.leaves[id][certs[0].SerialNumber.Text(16)] = certs[0]
}

func (l *handshakeLog) fail(side string, err error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.failures = append(l.failures, fmt.Sprintf("%s %s: %v", time.Now().Format(time.RFC3339Nano), side, err))
}

func (l *handshakeLog) exchanged() {
	l.mu.Lock()
	defer l.mu.Unlock()
	now := time.Now()
	if !l.lastOK.IsZero() && now.Sub(l.lastOK) > l.maxGap {
		l.maxGap = now.Sub(l.lastOK)
	}
	l.lastOK = now
	l.exchanges++
}

// counts returns how many roots have been seen, and how many intermediates
// beyond the first under each root: root and intermediate-only rotations.
func (l *handshakeLog) counts() (roots, intermediateRotations int, lastNewRoot time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	perRoot := map[string]int{}
	for _, s := range l.inters {
		perRoot[s.root]++
	}
	for _, n := range perRoot {
		intermediateRotations += n - 1
	}
	for _, r := range l.roots {
		if r.first.After(lastNewRoot) {
			lastNewRoot = r.first
		}
	}
	return len(l.roots), intermediateRotations, lastNewRoot
}

// byFirstSeen returns m's certificates in the order they were first seen.
func byFirstSeen(m map[string]*seenCert) []*seenCert {
	out := make([]*seenCert, 0, len(m))
	for _, s := range m {
		out = append(out, s)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].first.Before(out[j].first) })
	return out
}

// mtlsServer is the server workload: it echoes one line per connection.
type mtlsServer struct {
	lis  net.Listener
	wg   sync.WaitGroup
	addr string
}

func startMTLSServer(t testing.TB, src *workloadapi.X509Source, client spiffeid.ID, log *handshakeLog) *mtlsServer {
	t.Helper()
	cfg := log.hook(tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeID(client)), "server", src)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := &mtlsServer{lis: lis, addr: lis.Addr().String()}
	s.wg.Add(1)
	go func() {
		defer s.wg.Done()
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			s.wg.Add(1)
			go func() {
				defer s.wg.Done()
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(exchangeTimeout))
				tc := tls.Server(conn, cfg)
				if err := tc.Handshake(); err != nil {
					log.fail("server handshake", err)
					return
				}
				line, err := bufio.NewReader(tc).ReadString('\n')
				if err == nil {
					_, err = tc.Write([]byte(line))
				}
				if err != nil {
					log.fail("server echo", err)
				}
			}()
		}
	}()
	return s
}

func (s *mtlsServer) stop() {
	s.lis.Close()
	s.wg.Wait()
}

// mtlsClient is the client workload: one exchange after another, each on a
// new connection, until stopped. It never abandons an exchange half way, so
// that stopping it fails nothing on the server's side.
type mtlsClient struct {
	stopped atomic.Bool
	done    chan struct{}
}

func startMTLSClient(src *workloadapi.X509Source, server spiffeid.ID, addr string, pause time.Duration, log *handshakeLog) *mtlsClient {
	// No ClientSessionCache: every connection is a full handshake that
	// verifies the server's current chain.
	cfg := log.hook(tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeID(server)), "client", src)
	c := &mtlsClient{done: make(chan struct{})}
	go func() {
		defer close(c.done)
		for !c.stopped.Load() {
			if err := exchange(cfg, addr); err != nil {
				log.fail("client", err)
			} else {
				log.exchanged()
			}
			time.Sleep(pause)
		}
	}()
	return c
}

func exchange(cfg *tls.Config, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), exchangeTimeout)
	defer cancel()
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(exchangeTimeout))
	const msg = "ping\n"
	if _, err := conn.Write([]byte(msg)); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if got != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}

func (c *mtlsClient) stop() {
	c.stopped.Store(true)
	<-c.done
}

// presence is when a root was in a workload's bundle.
type presence struct {
	first, last time.Time
	// removed is when it was first found missing after it had been there.
	removed time.Time
}

// bundleLog polls workloads' bundles.
type bundleLog struct {
	mu    sync.Mutex
	roots map[string]map[string]*presence // side → root serial → presence
	stopc chan struct{}
	done  chan struct{}
}

func watchBundles(sources map[string]*workloadapi.X509Source, every time.Duration) *bundleLog {
	b := &bundleLog{roots: map[string]map[string]*presence{}, stopc: make(chan struct{}), done: make(chan struct{})}
	for side := range sources {
		b.roots[side] = map[string]*presence{}
	}
	go func() {
		defer close(b.done)
		tick := time.NewTicker(every)
		defer tick.Stop()
		for {
			for side, src := range sources {
				b.poll(side, src)
			}
			select {
			case <-b.stopc:
				return
			case <-tick.C:
			}
		}
	}()
	return b
}

func (b *bundleLog) poll(side string, src *workloadapi.X509Source) {
	bundle, err := src.GetX509BundleForTrustDomain(td)
	now := time.Now()
	b.mu.Lock()
	defer b.mu.Unlock()
	here := map[string]bool{}
	if err == nil {
		for _, r := range bundle.X509Authorities() {
			k := r.SerialNumber.Text(16)
			here[k] = true
			p := b.roots[side][k]
			if p == nil {
				p = &presence{first: now}
				b.roots[side][k] = p
			}
			p.last = now
		}
	}
	for k, p := range b.roots[side] {
		if !here[k] && p.removed.IsZero() {
			p.removed = now
		}
	}
}

func (b *bundleLog) stop() {
	close(b.stopc)
	<-b.done
}

// presenceOf returns side's record of root, or nil.
func (b *bundleLog) presenceOf(side, root string) *presence {
	b.mu.Lock()
	defer b.mu.Unlock()
	if p := b.roots[side][root]; p != nil {
		cp := *p
		return &cp
	}
	return nil
}
