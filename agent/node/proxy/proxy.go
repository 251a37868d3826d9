// Package proxy is the node agent's L4 proxy for ambient mode: for every
// local workload in ambient mode it enters the pod's network namespace,
// installs the redirection (agent/capture) and listens there on 15001
// (outbound), 15006 (inbound plaintext, always refused: trustmesh is STRICT)
// and 15008 (inbound HBONE, agent/hbone). It learns the workloads and the
// policy revision over delta ADS from the xDS server, asks the control
// plane's ext_authz about every inbound connection, over mTLS with the node
// SVID, and asks again about every open one when the policy revision
// changes, closing those now denied.
//
// Outbound: the original destination is looked up among the workloads; an
// ambient or sidecar destination is reached over HBONE at its address port
// 15008, from a socket in the source pod's namespace, presenting the source
// workload's SVID and requiring the destination's SPIFFE ID; any other
// destination is passed through as plain TCP.
//
// Inbound, the application is reached from the proxy's socket in its own
// namespace. Where the kernel has TPROXY (capture.ProbeTPROXY, asked once)
// that socket is transparent and bound to the remote pod's address (the
// source of the HBONE connection, which the source node opens from the
// source pod's namespace), so the application sees the real source, as with
// Istio; otherwise it sees its own pod's address (REDIRECT), which the log
// says once and trustmesh_node_proxy_pods{inbound_source} shows.
package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"sync"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/capture"
	"github.com/trustmesh/trustmesh/agent/identity"
	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
	supervisor "github.com/trustmesh/trustmesh/internal/run"
)

// Defaults of Config.
const (
	DefaultDomain       = "cluster.local"
	DefaultAuthzTimeout = 5 * time.Second
	DefaultRetry        = 5 * time.Second
	// DefaultConnectTimeout bounds a connection to a peer's HBONE port, its
	// handshake, and a connection to the application.
	DefaultConnectTimeout = 10 * time.Second
)

// Identities gives the SVIDs of the node's workloads (the node agent's
// Holder).
type Identities interface {
	Store(id spiffeid.ID) *identity.Store
}

// Config is the node proxy's configuration.
type Config struct {
	// NodeName and NodeIP make the xDS node id
	// "node~NodeIP~NodeName~Domain"; workloads whose node is NodeName are
	// captured.
	NodeName, NodeIP, Domain string
	// XDSAddress and AuthzAddress are host:port; their serving
	// certificates must carry XDSServerName and AuthzServerName (default
	// the host) and chain to Roots.
	XDSAddress, XDSServerName     string
	AuthzAddress, AuthzServerName string
	Roots                         func() []*x509.Certificate
	// NodeCertificate is the node SVID, spiffe://TD/node/NodeName, that
	// the proxy authenticates with to both.
	NodeCertificate func() (*tls.Certificate, error)
	// Bundle verifies the workloads' peers.
	Bundle x509bundle.Source
	// Identities holds the local workloads' SVIDs.
	Identities Identities
	// Kubernetes: a pod's namespace is found from /proc under ProcRoot by
	// its UID; otherwise Workload.netns names it.
	Kubernetes bool
	ProcRoot   string
	// Rules is the redirection (default capture.DefaultRules(); IPv6 is
	// set per pod: wherever its namespace has IPv6).
	Rules capture.Rules

	AuthzTimeout   time.Duration
	ConnectTimeout time.Duration
	// MaxPendingHandshakes bounds, per pod, the connections to its HBONE
	// port that carry no tunnel yet (default DefaultMaxPendingHandshakes);
	// MaxInboundTunnels bounds the node's open inbound tunnels (default
	// DefaultMaxInboundTunnels). Past either, new ones are reset.
	MaxPendingHandshakes int
	MaxInboundTunnels    int
	// Retry is how often a pod whose setup failed is tried again.
	Retry      time.Duration
	Backoff    backoff.Backoff
	Now        func() time.Time // default time.Now
	Logger     *slog.Logger
	Registerer prometheus.Registerer
	// DialOptions are added to both gRPC connections (tests).
	DialOptions []grpc.DialOption
}

func (c *Config) dial(addr, serverName string) (*grpc.ClientConn, error) {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, fmt.Errorf("proxy: address %q: %w", addr, err)
	}
	if serverName == "" {
		serverName = host
	}
	tc := &tls.Config{
		MinVersion: tls.VersionTLS12,
		ServerName: serverName,
		GetClientCertificate: func(*tls.CertificateRequestInfo) (*tls.Certificate, error) {
			return c.NodeCertificate()
		},
		// Roots change with the CA's bundle: verified per handshake.
		InsecureSkipVerify: true, //nolint:gosec // verified below against the roots of the moment
		VerifyConnection: func(cs tls.ConnectionState) error {
			pool := x509.NewCertPool()
			for _, r := range c.Roots() {
				pool.AddCert(r)
			}
			if len(cs.PeerCertificates) == 0 {
				return errors.New("the server presented no certificate")
			}
			inter := x509.NewCertPool()
			for _, ic := range cs.PeerCertificates[1:] {
				inter.AddCert(ic)
			}
			_, err := cs.PeerCertificates[0].Verify(x509.VerifyOptions{DNSName: serverName, Roots: pool, Intermediates: inter})
			return err
		},
	}
	opts := append([]grpc.DialOption{grpc.WithTransportCredentials(credentials.NewTLS(tc))}, c.DialOptions...)
	conn, err := grpc.NewClient("passthrough:///"+addr, opts...)
	if err != nil {
		return nil, fmt.Errorf("proxy: %s: %w", addr, err)
	}
	return conn, nil
}

func (c *Config) dialXDS() (*grpc.ClientConn, error) { return c.dial(c.XDSAddress, c.XDSServerName) }

// Validate checks cfg.
func (c *Config) validate() error {
	var errs []error
	if c.NodeName == "" {
		errs = append(errs, errors.New("proxy: the node name is required"))
	}
	for _, a := range []struct{ name, v string }{{"xDS", c.XDSAddress}, {"ext_authz", c.AuthzAddress}} {
		if _, _, err := net.SplitHostPort(a.v); err != nil {
			errs = append(errs, fmt.Errorf("proxy: %s address %q: %w", a.name, a.v, err))
		}
	}
	if c.Roots == nil || c.NodeCertificate == nil || c.Bundle == nil || c.Identities == nil {
		errs = append(errs, errors.New("proxy: Roots, NodeCertificate, Bundle and Identities are required"))
	}
	if err := c.Rules.Validate(); err != nil {
		errs = append(errs, fmt.Errorf("proxy: %w", err))
	}
	return errors.Join(errs...)
}

// Proxy is the node proxy.
type Proxy struct {
	cfg    Config
	log    *slog.Logger
	m      *metrics
	nodeID string
	authz  authv3.AuthorizationClient
	aconn  *grpc.ClientConn

	inboundOpen atomic.Int64 // inbound tunnels open, over all pods
	// recheckGen counts re-checks begun; admitted holds, per tunnel being
	// admitted (its request's context), the count when its check began,
	// so that a tunnel admitted while a re-check ran is checked again.
	recheckGen atomic.Uint64
	admitted   sync.Map // context.Context -> uint64

	tproxyMu sync.Mutex
	tproxy   map[bool]bool // ProbeTPROXY's answer, by IPv6 included

	mu      sync.Mutex
	cfgNow  *config
	changed chan struct{}
	pods    map[string]*pod // by uid
}

// New checks cfg and makes a Proxy; Run starts it.
func New(cfg Config) (*Proxy, error) {
	if cfg.Rules == (capture.Rules{}) {
		cfg.Rules = capture.DefaultRules()
	}
	if cfg.Domain == "" {
		cfg.Domain = DefaultDomain
	}
	if cfg.ProcRoot == "" {
		cfg.ProcRoot = "/proc"
	}
	if cfg.AuthzTimeout <= 0 {
		cfg.AuthzTimeout = DefaultAuthzTimeout
	}
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.Retry <= 0 {
		cfg.Retry = DefaultRetry
	}
	if cfg.MaxPendingHandshakes <= 0 {
		cfg.MaxPendingHandshakes = DefaultMaxPendingHandshakes
	}
	if cfg.MaxInboundTunnels <= 0 {
		cfg.MaxInboundTunnels = DefaultMaxInboundTunnels
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Registerer == nil {
		cfg.Registerer = prometheus.NewRegistry()
	}
	if err := cfg.validate(); err != nil {
		return nil, err
	}
	m, err := newMetrics(cfg.Registerer)
	if err != nil {
		return nil, fmt.Errorf("proxy: %w", err)
	}
	aconn, err := cfg.dial(cfg.AuthzAddress, cfg.AuthzServerName)
	if err != nil {
		return nil, err
	}
	return &Proxy{
		cfg: cfg, log: cfg.Logger, m: m, nodeID: NodeID(cfg.NodeIP, cfg.NodeName, cfg.Domain),
		authz: authv3.NewAuthorizationClient(aconn), aconn: aconn,
		cfgNow:  &config{workloads: map[string]*workload{}, byAddr: map[netip.Addr]*workload{}},
		changed: make(chan struct{}), pods: map[string]*pod{}, tproxy: map[bool]bool{},
	}, nil
}

func (p *Proxy) current() *config {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cfgNow
}

func (p *Proxy) watch() (*config, <-chan struct{}) {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.cfgNow, p.changed
}

func (p *Proxy) publish(c *config) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cfgNow = c
	close(p.changed)
	p.changed = make(chan struct{})
}

// Run runs the proxy until ctx ends. The pods' rules stay then (see
// stopAll); a pod's are removed when it leaves ambient mode.
func (p *Proxy) Run(ctx context.Context) error {
	defer p.aconn.Close()
	return supervisor.Tasks(ctx, p.runXDS, p.runPods)
}

// runPods sets up and tears down the local ambient pods as the config
// changes, and re-checks open inbound connections when the policy
// revision does.
func (p *Proxy) runPods(ctx context.Context) error {
	defer p.stopAll()
	var lastRev string
	retry := time.NewTicker(p.cfg.Retry)
	defer retry.Stop()
	for {
		c, changed := p.watch()
		p.reconcile(ctx, c)
		if c.revision != lastRev {
			if lastRev != "" {
				p.recheckAll(ctx, c.revision)
			}
			lastRev = c.revision
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-changed:
		case <-retry.C:
		}
	}
}

// local reports whether w is captured by this node.
func (p *Proxy) local(w *workload) bool {
	return w.msg.GetNode() == p.cfg.NodeName && w.msg.GetMode() == ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT
}

func (p *Proxy) reconcile(ctx context.Context, c *config) {
	p.mu.Lock()
	pods := make(map[string]*pod, len(p.pods))
	for k, v := range p.pods {
		pods[k] = v
	}
	p.mu.Unlock()
	for uid, pd := range pods {
		w := c.workloads[uid]
		if w == nil || !p.local(w) {
			p.teardown(uid, pd)
			continue
		}
		// Addresses, labels: no connection is dropped, but new labels may
		// select other policies, so the pod's open ones are asked about again.
		if pd.set(w) {
			p.recheckGen.Add(1)
			p.recheck(ctx, "the workload's labels or identity changed", pd.inbound())
		}
	}
	for uid, w := range c.workloads {
		if !p.local(w) || pods[uid] != nil {
			continue
		}
		pd, err := p.setup(ctx, w)
		if err != nil {
			p.log.Warn("cannot capture an ambient pod yet; retrying", "workload", uid, "every", p.cfg.Retry, "error", err)
			continue
		}
		p.mu.Lock()
		p.pods[uid] = pd
		p.mu.Unlock()
		window := p.cfg.Now().Sub(w.arrived)
		p.m.setup.Observe(window.Seconds())
		p.log.Info("capturing an ambient pod", "workload", uid, "netns", pd.netns.Path, "id", w.id, "inbound_source", pd.sourceMode(), "uncaptured_for", window)
	}
}

// teardown stops capturing a pod that left ambient mode (or the node): its
// listeners close and its redirection is removed.
func (p *Proxy) teardown(uid string, pd *pod) {
	pd.stop()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := capture.Remove(ctx, pd.netns); err != nil {
		p.log.Warn("removing a pod's redirection", "workload", uid, "error", err)
	}
	p.mu.Lock()
	delete(p.pods, uid)
	p.mu.Unlock()
	p.log.Info("no longer capturing a pod", "workload", uid)
}

// stopAll closes every pod's listeners when the proxy stops, and leaves
// the redirection in place: until a proxy runs again (and Install, which
// is idempotent, finds the rules there), the pods' TCP is refused rather
// than sent or accepted in plaintext past the policy. Fail closed, as
// ztunnel's restart keeps the pods' rules.
func (p *Proxy) stopAll() {
	p.mu.Lock()
	pods := make(map[string]*pod, len(p.pods))
	for k, v := range p.pods {
		pods[k] = v
	}
	p.pods = map[string]*pod{}
	p.mu.Unlock()
	for _, pd := range pods {
		pd.stop()
	}
}

// recheckAll asks again about every open inbound connection and closes
// (resets) the denied ones.
func (p *Proxy) recheckAll(ctx context.Context, rev string) {
	p.recheckGen.Add(1) // before the list: a tunnel not on it sees this
	p.mu.Lock()
	var conns []*inboundConn
	for _, pd := range p.pods {
		conns = append(conns, pd.inbound()...)
	}
	p.mu.Unlock()
	p.recheck(ctx, "policy revision "+rev, conns)
}

// recheck asks about conns again and closes (resets) the denied ones.
func (p *Proxy) recheck(ctx context.Context, why string, conns []*inboundConn) {
	if len(conns) == 0 {
		return
	}
	p.log.Info("checking open inbound connections again", "why", why, "connections", len(conns))
	var wg sync.WaitGroup
	sem := make(chan struct{}, 16)
	for _, ic := range conns {
		wg.Add(1)
		sem <- struct{}{}
		go func() {
			defer func() { <-sem; wg.Done() }()
			err := p.authorize(ctx, ic.current())
			var denied *deniedError
			if errors.As(err, &denied) {
				p.log.Info("closing an inbound connection the policy now denies", "source", ic.check.source, "destination", ic.check.destination, "reason", denied.msg)
				ic.kill("policy")
			} else if err != nil {
				// Fail closed: a connection the new policy cannot be
				// asked about is not kept.
				p.log.Warn("re-checking an inbound connection failed; closing it", "source", ic.check.source, "error", err)
				ic.kill("authz_error")
			}
		}()
	}
	wg.Wait()
}
