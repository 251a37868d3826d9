//go:build linux

package proxy

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	rpcstatus "google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/anypb"

	"github.com/trustmesh/trustmesh/agent/capture"
	"github.com/trustmesh/trustmesh/agent/hbone"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
)

var td = spiffeid.RequireTrustDomainFromString("example.org")

func requireRoot(t *testing.T) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: the test makes network namespaces, veth pairs and iptables rules")
	}
	for _, cmd := range []string{"ip", "nsenter", "iptables-restore"} {
		if _, err := exec.LookPath(cmd); err != nil {
			t.Fatalf("%s is missing (make test installs it with hack/debian-tools.sh): %v", cmd, err)
		}
	}
}

func sh(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%s: %v: %s", strings.Join(args, " "), err, out)
	}
}

var nsSeq atomic.Int64

// podPair makes two pod namespaces joined by a veth pair: 10.78.0.1 and .2.
func podPair(t *testing.T) (a, b string) {
	t.Helper()
	mk := func() string {
		name := fmt.Sprintf("tmpx-%d-%d", os.Getpid(), nsSeq.Add(1))
		sh(t, "ip", "netns", "add", name)
		t.Cleanup(func() { _ = exec.Command("ip", "netns", "del", name).Run() })
		sh(t, "ip", "-n", name, "link", "set", "lo", "up")
		return name
	}
	a, b = mk(), mk()
	sh(t, "ip", "-n", a, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", b)
	for i, n := range []string{a, b} {
		sh(t, "ip", "-n", n, "addr", "add", fmt.Sprintf("10.78.0.%d/24", i+1), "dev", "eth0")
		sh(t, "ip", "-n", n, "-6", "addr", "add", fmt.Sprintf("fd78::%d/64", i+1), "dev", "eth0", "nodad")
		sh(t, "ip", "-n", n, "link", "set", "eth0", "up")
	}
	return a, b
}

// fakeXDS is a minimal delta ADS server: it sends every resource of a type
// on subscription and pushes what the test sets later; it records ACKs and
// NACKs.
type fakeXDS struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	mu      sync.Mutex
	res     map[string]map[string]*anypb.Any // type -> name -> resource
	push    chan string                      // a type to send again
	nacks   []string
	acks    int
	nodeIDs []string
	initial []map[string]string // the Workload subscriptions' initial versions
	peers   []string
}

func newFakeXDS() *fakeXDS {
	return &fakeXDS{res: map[string]map[string]*anypb.Any{ambientv1.WorkloadType: {}, ambientv1.AuthorizationType: {}}, push: make(chan string, 16)}
}

func (f *fakeXDS) setAny(typ, name string, a *anypb.Any) {
	f.mu.Lock()
	f.res[typ][name] = a
	f.mu.Unlock()
	f.push <- typ
}

var nonce atomic.Int64

func (f *fakeXDS) response(typ string) *discoveryv3.DeltaDiscoveryResponse {
	f.mu.Lock()
	defer f.mu.Unlock()
	r := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: typ, Nonce: fmt.Sprint(nonce.Add(1))}
	for name, a := range f.res[typ] {
		r.Resources = append(r.Resources, &discoveryv3.Resource{Name: name, Version: fmt.Sprint(nonce.Load()), Resource: a})
	}
	return r
}

func (f *fakeXDS) DeltaAggregatedResources(s discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesServer) error {
	reqs := make(chan *discoveryv3.DeltaDiscoveryRequest)
	errc := make(chan error, 1)
	go func() {
		for {
			r, err := s.Recv()
			if err != nil {
				errc <- err
				return
			}
			reqs <- r
		}
	}()
	for {
		select {
		case err := <-errc:
			return err
		case typ := <-f.push:
			if err := s.Send(f.response(typ)); err != nil {
				return err
			}
		case r := <-reqs:
			f.mu.Lock()
			switch {
			case r.GetNode() != nil:
				f.nodeIDs = append(f.nodeIDs, r.GetNode().GetId())
			}
			switch {
			case r.GetErrorDetail() != nil:
				f.nacks = append(f.nacks, r.GetErrorDetail().GetMessage())
			case r.GetResponseNonce() != "":
				f.acks++
			}
			if r.GetResponseNonce() == "" && r.GetTypeUrl() == ambientv1.WorkloadType {
				f.initial = append(f.initial, r.GetInitialResourceVersions())
			}
			f.mu.Unlock()
			if r.GetResponseNonce() == "" {
				if err := s.Send(f.response(r.GetTypeUrl())); err != nil {
					return err
				}
			}
		}
	}
}

// fakeAuthz allows unless deny says otherwise; it records the requests.
type fakeAuthz struct {
	authv3.UnimplementedAuthorizationServer
	deny atomic.Bool
	// gate, when set, runs in each check after its decision is taken.
	gate atomic.Pointer[func()]
	mu   sync.Mutex
	reqs []*authv3.CheckRequest
}

func (f *fakeAuthz) Check(_ context.Context, r *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	f.mu.Lock()
	f.reqs = append(f.reqs, r)
	f.mu.Unlock()
	deny := f.deny.Load()
	if g := f.gate.Load(); g != nil {
		(*g)()
	}
	if deny {
		return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.PermissionDenied), Message: "policy deny-a, rule 0"}}, nil
	}
	return &authv3.CheckResponse{Status: &rpcstatus.Status{Code: int32(codes.OK)}}, nil
}

func (f *fakeAuthz) last() *authv3.CheckRequest {
	f.mu.Lock()
	defer f.mu.Unlock()
	if len(f.reqs) == 0 {
		return nil
	}
	return f.reqs[len(f.reqs)-1]
}

type idents map[spiffeid.ID]*identity.Store

func (m idents) Store(id spiffeid.ID) *identity.Store { return m[id] }

type env struct {
	t        *testing.T
	ca       *testca.Authority
	a, b     string // namespace names
	idA, idB spiffeid.ID
	xds      *fakeXDS
	authz    *fakeAuthz
	reg      *prometheus.Registry
	ids      idents
	p        *Proxy
	xdsAddr  string
	servers  []*grpc.Server // xDS first
	stop     func()         // stops the proxy
	clientID []string       // the client certificates' URIs the servers saw
}

// serveTLS serves g over mTLS with a serving certificate for 127.0.0.1,
// requiring a client certificate of the CA.
func (e *env) serveTLS(register func(*grpc.Server)) string {
	return e.serveTLSOn("127.0.0.1:0", register)
}

func (e *env) serveTLSOn(addr string, register func(*grpc.Server)) string {
	cert, err := e.ca.ServingCertificate(time.Now(), nil, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		e.t.Fatal(err)
	}
	pool := x509.NewCertPool()
	for _, r := range e.ca.Bundle().X509Authorities() {
		pool.AddCert(r)
	}
	var mu sync.Mutex
	tc := &tls.Config{Certificates: []tls.Certificate{cert}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool,
		VerifyPeerCertificate: func(_ [][]byte, chains [][]*x509.Certificate) error {
			mu.Lock()
			defer mu.Unlock()
			e.clientID = append(e.clientID, chains[0][0].URIs[0].String())
			return nil
		}}
	g := grpc.NewServer(grpc.Creds(credentials.NewTLS(tc)))
	register(g)
	e.servers = append(e.servers, g)
	l, err := net.Listen("tcp", addr)
	if err != nil {
		e.t.Fatal(err)
	}
	go func() { _ = g.Serve(l) }()
	e.t.Cleanup(g.Stop)
	return l.Addr().String()
}

func workloadAny(t *testing.T, w *ambientv1.Workload) *anypb.Any {
	a, err := anypb.New(w)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

func (e *env) setWorkload(uid, ns, ip string, id spiffeid.ID, mode ambientv1.DataPlaneMode) {
	e.setWorkloadLabels(uid, ns, ip, id, mode, map[string]string{"app": uid})
}

// setWorkloadLabels sends a workload with its IPv4 address ip and the IPv6
// address of the same host number in fd78::/64.
func (e *env) setWorkloadLabels(uid, ns, ip string, id spiffeid.ID, mode ambientv1.DataPlaneMode, labels map[string]string) {
	v6 := "fd78::" + ip[strings.LastIndexByte(ip, '.')+1:]
	e.xds.setAny(ambientv1.WorkloadType, uid, workloadAny(e.t, &ambientv1.Workload{
		Uid: uid, Name: uid, Namespace: "default", SpiffeId: id.String(), Node: "n1",
		Addresses: []string{ip, v6}, Labels: labels, Mode: mode, Netns: ns,
	}))
}

func (e *env) setRevision(rev string) {
	a, err := anypb.New(&ambientv1.Authorization{Revision: rev})
	if err != nil {
		e.t.Fatal(err)
	}
	e.xds.setAny(ambientv1.AuthorizationType, ambientv1.AuthorizationName, a)
}

// start runs a proxy for node n1 with pods a (10.78.0.1) and b
// (10.78.0.2), both ambient, and an echo server in b on port 8080.
func start(t *testing.T, opts ...func(*Config)) *env {
	requireRoot(t)
	now := time.Now()
	e := &env{t: t, ca: testca.New(t, td, now.Add(-time.Minute)), xds: newFakeXDS(), authz: &fakeAuthz{}, reg: prometheus.NewRegistry()}
	e.a, e.b = podPair(t)
	e.idA = spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/a")
	e.idB = spiffeid.RequireFromString("spiffe://example.org/ns/default/sa/b")
	nodeID := spiffeid.RequireFromString("spiffe://example.org/node/n1")
	e.ids = idents{}
	for _, id := range []spiffeid.ID{e.idA, e.idB, nodeID} {
		st := identity.New()
		st.SetSVID(e.ca.SVID(t, id, now.Add(-time.Minute), time.Hour))
		st.SetBundle(e.ca.Bundle())
		e.ids[id] = st
	}
	e.xdsAddr = e.serveTLS(func(g *grpc.Server) { discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, e.xds) })
	authzAddr := e.serveTLS(func(g *grpc.Server) { authv3.RegisterAuthorizationServer(g, e.authz) })
	e.setWorkload("a", e.a, "10.78.0.1", e.idA, ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT)
	e.setWorkload("b", e.b, "10.78.0.2", e.idB, ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT)
	e.setRevision("1")
	for len(e.xds.push) > 0 { // the subscriptions send them all
		<-e.xds.push
	}
	cfg := Config{
		NodeName: "n1", NodeIP: "192.0.2.1", XDSAddress: e.xdsAddr, AuthzAddress: authzAddr,
		Roots:           func() []*x509.Certificate { return e.ca.Bundle().X509Authorities() },
		NodeCertificate: func() (*tls.Certificate, error) { return certOf(e.ids, nodeID) },
		Bundle:          e.ca.Bundle(), Identities: e.ids, Retry: 200 * time.Millisecond,
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil)), Registerer: e.reg,
	}
	for _, o := range opts {
		o(&cfg)
	}
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.p = p
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- p.Run(ctx) }()
	var stopped sync.Once
	e.stop = func() {
		stopped.Do(func() {
			cancel()
			if err := <-done; !errors.Is(err, context.Canceled) {
				t.Errorf("Run: %v", err)
			}
		})
	}
	t.Cleanup(e.stop)
	// The echo server in b.
	l, err := capture.NetnsByName(e.b).Listen(context.Background(), "tcp", "[::]:8080", 0)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go func() { _, _ = io.Copy(c, c); _ = c.Close() }()
		}
	}()
	// Wait until both pods are captured.
	waitFor(t, "both pods captured", func() bool {
		p.mu.Lock()
		defer p.mu.Unlock()
		return len(p.pods) == 2
	})
	return e
}

func certOf(ids idents, id spiffeid.ID) (*tls.Certificate, error) {
	snap, _ := ids[id].Load()
	s := snap.SVID
	der := [][]byte{}
	for _, c := range s.Certificates {
		der = append(der, c.Raw)
	}
	return &tls.Certificate{Certificate: der, PrivateKey: s.PrivateKey}, nil
}

func waitFor(t *testing.T, what string, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// dialFromA connects from pod a as an unmodified application would (no
// mark: captured).
func (e *env) dialFromA(addr string, mark int) net.Conn {
	e.t.Helper()
	c, err := capture.NetnsByName(e.a).Dial(context.Background(), "tcp4", addr, mark)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = c.Close() })
	return c
}

// tryEcho dials from pod a and echoes msg; a reset may come as soon as the
// connect (the proxy answers locally and refuses at once).
func (e *env) tryEcho(addr string, mark int, msg string) (string, error) {
	c, err := capture.NetnsByName(e.a).Dial(context.Background(), "tcp", addr, mark)
	if err != nil {
		return "", err
	}
	defer c.Close()
	return echo(c, msg)
}

func echo(c net.Conn, msg string) (string, error) {
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.WriteString(c, msg); err != nil {
		return "", err
	}
	buf := make([]byte, len(msg))
	_, err := io.ReadFull(c, buf)
	return string(buf), err
}

func counter(t *testing.T, c *prometheus.CounterVec, labels ...string) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.WithLabelValues(labels...).Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}

func TestOutboundTunnelledAndAuthorized(t *testing.T) {
	e := start(t)
	c := e.dialFromA("10.78.0.2:8080", 0)
	got, err := echo(c, "hello over hbone")
	if err != nil || got != "hello over hbone" {
		t.Fatalf("echo = %q, %v", got, err)
	}
	p := e.proxyMetrics()
	if counter(t, p.opened, Outbound) != 1 || counter(t, p.opened, Inbound) != 1 {
		t.Fatalf("opened outbound %v inbound %v, want 1 and 1: the connection was not tunnelled", counter(t, p.opened, Outbound), counter(t, p.opened, Inbound))
	}
	r := e.authz.last()
	if r == nil {
		t.Fatal("ext_authz was not asked")
	}
	a := r.GetAttributes()
	if a.GetSource().GetPrincipal() != e.idA.String() || a.GetDestination().GetPrincipal() != e.idB.String() ||
		a.GetSource().GetAddress().GetSocketAddress().GetAddress() != "10.78.0.1" ||
		a.GetDestination().GetAddress().GetSocketAddress().GetAddress() != "10.78.0.2" ||
		a.GetDestination().GetAddress().GetSocketAddress().GetPortValue() != 8080 ||
		a.GetDestination().GetLabels()["app"] != "b" || a.GetRequest().GetHttp() != nil {
		t.Fatalf("check attributes = %v", a)
	}
	for _, id := range e.clientID {
		if id != "spiffe://example.org/node/n1" {
			t.Fatalf("a server saw client %s, want the node SVID", id)
		}
	}
	e.xds.mu.Lock()
	defer e.xds.mu.Unlock()
	if len(e.xds.nodeIDs) == 0 || e.xds.nodeIDs[0] != "node~192.0.2.1~n1~cluster.local" {
		t.Fatalf("node ids %v", e.xds.nodeIDs)
	}
	if e.xds.acks < 2 || len(e.xds.nacks) != 0 {
		t.Fatalf("acks %d nacks %v", e.xds.acks, e.xds.nacks)
	}
}

func (e *env) proxyMetrics() *metrics { return e.p.m }

func isReset(err error) bool { return errors.Is(err, syscall.ECONNRESET) }

func TestDeniedIsReset(t *testing.T) {
	e := start(t)
	e.authz.deny.Store(true)
	_, err := e.tryEcho("10.78.0.2:8080", 0, "x")
	if !isReset(err) {
		t.Fatalf("a denied connection: %v, want a reset", err)
	}
	m := e.proxyMetrics()
	if counter(t, m.refused, Inbound, "denied") != 1 || counter(t, m.opened, Inbound) != 0 {
		t.Fatalf("refused{inbound,denied} = %v, opened inbound %v", counter(t, m.refused, Inbound, "denied"), counter(t, m.opened, Inbound))
	}
}

func TestRevisionChangeClosesDenied(t *testing.T) {
	e := start(t)
	c := e.dialFromA("10.78.0.2:8080", 0)
	if _, err := echo(c, "before"); err != nil {
		t.Fatal(err)
	}
	e.authz.deny.Store(true)
	e.setRevision("2")
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	_, err := io.ReadFull(c, make([]byte, 1))
	if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("the connection the new policy denies stayed open: %v", err)
	}
	m := e.proxyMetrics()
	waitFor(t, "closed{inbound,policy}", func() bool { return counter(t, m.closed, Inbound, "policy") == 1 })
}

func TestRevisionChangeKeepsAllowed(t *testing.T) {
	e := start(t)
	c := e.dialFromA("10.78.0.2:8080", 0)
	if _, err := echo(c, "before"); err != nil {
		t.Fatal(err)
	}
	n := len(e.authz.reqs)
	e.setRevision("2")
	waitFor(t, "the re-check", func() bool { e.authz.mu.Lock(); defer e.authz.mu.Unlock(); return len(e.authz.reqs) > n })
	if got, err := echo(c, "after"); err != nil || got != "after" {
		t.Fatalf("an allowed connection after the re-check: %q, %v", got, err)
	}
}

func TestInboundPlaintextRefused(t *testing.T) {
	e := start(t)
	// Marked: a's capture lets it out as plaintext, as a non-mesh peer's.
	_, err := e.tryEcho("10.78.0.2:8080", capture.DefaultMark, "plain")
	if !isReset(err) {
		t.Fatalf("inbound plaintext: %v, want a reset", err)
	}
	if got := counter(t, e.proxyMetrics().refused, InboundPlaintext, "strict"); got != 1 {
		t.Fatalf("refused{inbound_plaintext,strict} = %v", got)
	}
}

func TestWrongPeerIDRefused(t *testing.T) {
	e := start(t)
	// b's address now answers with another identity than the model's.
	impostor := spiffeid.RequireFromString("spiffe://example.org/ns/evil/sa/evil")
	e.ids[e.idB].SetSVID(e.ca.SVID(t, impostor, time.Now().Add(-time.Minute), time.Hour))
	_, err := e.tryEcho("10.78.0.2:8080", 0, "x")
	if !isReset(err) {
		t.Fatalf("a destination with the wrong SPIFFE ID: %v, want a reset", err)
	}
	m := e.proxyMetrics()
	if counter(t, m.handshake, Outbound) != 1 || counter(t, m.refused, Outbound, "handshake") != 1 || counter(t, m.opened, Inbound) != 0 {
		t.Fatalf("handshake failures %v, refused %v, inbound opened %v", counter(t, m.handshake, Outbound), counter(t, m.refused, Outbound, "handshake"), counter(t, m.opened, Inbound))
	}
}

func TestNACKKeepsLastGoodConfig(t *testing.T) {
	e := start(t)
	e.xds.setAny(ambientv1.WorkloadType, "bad", workloadAny(t, &ambientv1.Workload{Uid: "bad", SpiffeId: "spiffe://example.org/x", Addresses: []string{"not-an-ip"}, Mode: ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT}))
	waitFor(t, "a NACK", func() bool { e.xds.mu.Lock(); defer e.xds.mu.Unlock(); return len(e.xds.nacks) == 1 })
	if !strings.Contains(e.xds.nacks[0], "not-an-ip") {
		t.Fatalf("NACK %q does not say why", e.xds.nacks[0])
	}
	if got, err := e.tryEcho("10.78.0.2:8080", 0, "still"); err != nil || got != "still" {
		t.Fatalf("after a NACK: %q, %v", got, err)
	}
}

func TestPodLeavingIsReleased(t *testing.T) {
	e := start(t)
	e.setWorkload("a", e.a, "10.78.0.1", e.idA, ambientv1.DataPlaneMode_DATA_PLANE_MODE_NONE)
	// Once a is no longer captured, its connection to b goes out as
	// plaintext and b's proxy refuses it (STRICT).
	waitFor(t, "a released", func() bool {
		_, err := e.tryEcho("10.78.0.2:8080", 0, "x")
		return isReset(err) && counter(t, e.proxyMetrics().refused, InboundPlaintext, "strict") >= 1
	})
}

func TestAuthorityNotThisWorkloadRefused(t *testing.T) {
	e := start(t)
	raw, err := capture.NetnsByName(e.a).Dial(context.Background(), "tcp4", "10.78.0.2:15008", capture.DefaultMark)
	if err != nil {
		t.Fatal(err)
	}
	defer raw.Close()
	// A tunnel to b's proxy for an address that is not b's (a's own).
	_, err = hbone.Dial(context.Background(), raw, hbone.DialConfig{
		Cert:   func() (*tls.Certificate, error) { return certOf(e.ids, e.idA) },
		Bundle: e.ca.Bundle(), PeerID: e.idB, Authority: "10.78.0.1:8080",
	})
	var st *hbone.StatusError
	if !errors.As(err, &st) || st.Code != 403 {
		t.Fatalf("a CONNECT to another workload's address: %v, want 403", err)
	}
	if got := counter(t, e.proxyMetrics().refused, Inbound, "authority"); got != 1 {
		t.Fatalf("refused{inbound,authority} = %v", got)
	}
	if e.authz.last() != nil {
		t.Fatal("ext_authz was asked about a tunnel to another workload's address")
	}
}

func TestIPv6TunnelledAndAuthorized(t *testing.T) {
	e := start(t)
	if got, err := e.tryEcho("[fd78::2]:8080", 0, "hello v6"); err != nil || got != "hello v6" {
		t.Fatalf("echo over IPv6 = %q, %v", got, err)
	}
	if got := counter(t, e.proxyMetrics().opened, Inbound); got != 1 {
		t.Fatalf("inbound tunnels %v, want 1", got)
	}
	a := e.authz.last().GetAttributes()
	if a.GetSource().GetAddress().GetSocketAddress().GetAddress() != "fd78::1" ||
		a.GetDestination().GetAddress().GetSocketAddress().GetAddress() != "fd78::2" {
		t.Fatalf("check attributes = %v", a)
	}
	if _, err := e.tryEcho("[fd78::2]:8080", capture.DefaultMark, "plain"); !isReset(err) {
		t.Fatalf("IPv6 inbound plaintext: %v, want a reset", err)
	}
}

func TestWorkloadUpdateKeepsConnections(t *testing.T) {
	e := start(t)
	c := e.dialFromA("10.78.0.2:8080", 0)
	if _, err := echo(c, "before"); err != nil {
		t.Fatal(err)
	}
	e.setWorkloadLabels("b", e.b, "10.78.0.2", e.idB, ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT, map[string]string{"app": "b", "version": "v2"})
	waitFor(t, "the update", func() bool { return e.p.current().workloads["b"].msg.GetLabels()["version"] == "v2" })
	if got, err := echo(c, "after"); err != nil || got != "after" {
		t.Fatalf("an open connection after its workload changed: %q, %v", got, err)
	}
	if _, err := e.tryEcho("10.78.0.2:8080", 0, "new"); err != nil {
		t.Fatal(err)
	}
	if got := e.authz.last().GetAttributes().GetDestination().GetLabels()["version"]; got != "v2" {
		t.Fatalf("a new connection was checked with the old labels (version %q)", got)
	}
}

func TestLabelChangeRechecks(t *testing.T) {
	e := start(t)
	c := e.dialFromA("10.78.0.2:8080", 0)
	if _, err := echo(c, "before"); err != nil {
		t.Fatal(err)
	}
	// New labels select other policies without a new revision.
	e.authz.deny.Store(true)
	e.setWorkloadLabels("b", e.b, "10.78.0.2", e.idB, ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT, map[string]string{"app": "b", "locked": "yes"})
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(c, make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("a connection the relabelled workload's policy denies stayed open: %v", err)
	}
	if got := e.authz.last().GetAttributes().GetDestination().GetLabels()["locked"]; got != "yes" {
		t.Fatalf("re-checked with the old labels (locked %q)", got)
	}
}

func TestXDSOutageKeepsConfigAndResumes(t *testing.T) {
	e := start(t)
	e.servers[0].Stop()
	// Disconnected: the last configuration stays in force.
	if got, err := e.tryEcho("10.78.0.2:8080", 0, "during"); err != nil || got != "during" {
		t.Fatalf("while the xDS server is down: %q, %v", got, err)
	}
	// A server again on the same address: the proxy resubscribes, naming
	// what it holds, and takes changes from it.
	x := newFakeXDS()
	x.res = e.xds.res
	e.xds = x
	e.serveTLSOn(e.xdsAddr, func(g *grpc.Server) { discoveryv3.RegisterAggregatedDiscoveryServiceServer(g, x) })
	waitFor(t, "the resubscription", func() bool { x.mu.Lock(); defer x.mu.Unlock(); return len(x.initial) > 0 })
	x.mu.Lock()
	init := x.initial[0]
	x.mu.Unlock()
	if _, ok := init["a"]; !ok || len(init) != 2 {
		t.Fatalf("resubscribed with initial versions %v, want a's and b's", init)
	}
	e.setWorkload("a", e.a, "10.78.0.1", e.idA, ambientv1.DataPlaneMode_DATA_PLANE_MODE_NONE)
	waitFor(t, "a released after the reconnect", func() bool {
		e.p.mu.Lock()
		defer e.p.mu.Unlock()
		return len(e.p.pods) == 1
	})
}

func TestStopFailsClosed(t *testing.T) {
	e := start(t)
	e.stop()
	for _, ns := range []string{e.a, e.b} {
		out, err := exec.Command("ip", "netns", "exec", ns, "iptables-save").CombinedOutput()
		if err != nil {
			t.Fatalf("iptables-save in %s: %v: %s", ns, err, out)
		}
		if !strings.Contains(string(out), "TRUSTMESH_OUTPUT") {
			t.Fatalf("the redirection of %s was removed when the proxy stopped:\n%s", ns, out)
		}
	}
	// Without the proxy, a's connection is refused, not sent in plaintext
	// past the policy.
	if got, err := e.tryEcho("10.78.0.2:8080", 0, "bare"); err == nil {
		t.Fatalf("with the proxy stopped a connection went through: %q", got)
	}
}

// serveInB runs handle for every connection to port in pod b; handle owns c.
func (e *env) serveInB(port int, handle func(c net.Conn)) {
	e.t.Helper()
	l, err := capture.NetnsByName(e.b).Listen(context.Background(), "tcp", fmt.Sprintf("[::]:%d", port), 0)
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { _ = l.Close() })
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
}

// readAllFromA connects from pod a (captured) and reads until EOF without
// closing its own half.
func (e *env) readAllFromA(addr string) (string, error) {
	c, err := capture.NetnsByName(e.a).Dial(context.Background(), "tcp", addr, 0)
	if err != nil {
		return "", err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	b, err := io.ReadAll(c)
	return string(b), err
}

func TestServerClosesFirst(t *testing.T) {
	e := start(t)
	e.serveInB(8082, func(c net.Conn) {
		_, _ = io.WriteString(c, "220 banner, then goodbye\n")
		_ = c.Close()
	})
	for _, addr := range []string{"10.78.0.2:8082", "[fd78::2]:8082"} {
		got, err := e.readAllFromA(addr)
		if err != nil || got != "220 banner, then goodbye\n" {
			t.Fatalf("%s: a server that writes and closes first: %q, %v; want the banner and a clean EOF", addr, got, err)
		}
	}
	m := e.proxyMetrics()
	waitFor(t, "both directions closed as done", func() bool {
		return counter(t, m.closed, Inbound, "done") == 2 && counter(t, m.closed, Outbound, "done") == 2
	})
}

func TestInboundKeepsSourceAddress(t *testing.T) {
	e := start(t)
	e.serveInB(8083, func(c net.Conn) {
		_, _ = io.WriteString(c, addrPort(c.RemoteAddr()).Addr().Unmap().String())
		_ = c.Close()
	})
	for addr, want := range map[string]string{"10.78.0.2:8083": "10.78.0.1", "[fd78::2]:8083": "fd78::1"} {
		got, err := e.readAllFromA(addr)
		if err != nil || got != want {
			t.Errorf("%s: the application saw a connection from %q (%v), want the remote pod's %s", addr, got, err, want)
		}
	}
	var m dto.Metric
	if err := e.p.m.pods.WithLabelValues(SourceTPROXY).Write(&m); err != nil || m.GetGauge().GetValue() != 2 {
		t.Errorf("pods{inbound_source=tproxy} = %v, want 2", m.GetGauge().GetValue())
	}
	// Stopping releases the gauge.
	e.stop()
	if err := e.p.m.pods.WithLabelValues(SourceTPROXY).Write(&m); err != nil || m.GetGauge().GetValue() != 0 {
		t.Errorf("after stop pods{inbound_source=tproxy} = %v, want 0", m.GetGauge().GetValue())
	}
}

func TestOutboundTunnelsShareAConnection(t *testing.T) {
	e := start(t)
	ports := map[uint32]bool{}
	for i := range 3 {
		if got, err := e.tryEcho("10.78.0.2:8080", 0, "again"); err != nil || got != "again" {
			t.Fatalf("echo %d: %q, %v", i, got, err)
		}
		ports[e.authz.last().GetAttributes().GetSource().GetAddress().GetSocketAddress().GetPortValue()] = true
	}
	// The checks name the HBONE connection's source port: one connection.
	if len(ports) != 1 {
		t.Fatalf("3 tunnels from a to b came over %d HBONE connections (source ports %v), want 1", len(ports), ports)
	}
	if got := counter(t, e.proxyMetrics().opened, Inbound); got != 3 {
		t.Fatalf("inbound tunnels %v, want 3", got)
	}
}

func histogram(t *testing.T, h prometheus.Histogram) (uint64, float64) {
	t.Helper()
	var m dto.Metric
	if err := h.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetHistogram().GetSampleCount(), m.GetHistogram().GetSampleSum()
}

// TestCaptureWindow measures the time from an ambient workload's arrival
// in the node's config to its capture (redirection and listeners).
func TestCaptureWindow(t *testing.T) {
	e := start(t)
	n, sum := histogram(t, e.p.m.setup)
	if n != 2 || sum <= 0 || sum > 20 {
		t.Fatalf("capture_setup_seconds: %d samples, sum %v s; want 2 (pods a and b), each within 10 s", n, sum)
	}
	// A workload that comes into ambient mode while the proxy runs.
	e.setWorkload("a", e.a, "10.78.0.1", e.idA, ambientv1.DataPlaneMode_DATA_PLANE_MODE_NONE)
	waitFor(t, "a released", func() bool { e.p.mu.Lock(); defer e.p.mu.Unlock(); return len(e.p.pods) == 1 })
	e.setWorkload("a", e.a, "10.78.0.1", e.idA, ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT)
	waitFor(t, "a captured again", func() bool { e.p.mu.Lock(); defer e.p.mu.Unlock(); return len(e.p.pods) == 2 })
	n2, sum2 := histogram(t, e.p.m.setup)
	if n2 != 3 {
		t.Fatalf("capture_setup_seconds: %d samples, want 3", n2)
	}
	t.Logf("capture window: first two pods %.0f ms on average; a pod arriving later %.0f ms", sum/2*1000, (sum2-sum)*1000)
}

func TestRedirectWhereNoTPROXY(t *testing.T) {
	var probes atomic.Int32
	probeTPROXY = func(context.Context, capture.Netns, bool) error { probes.Add(1); return errors.New("no xt_TPROXY") }
	t.Cleanup(func() { probeTPROXY = capture.ProbeTPROXY })
	e := start(t)
	e.serveInB(8083, func(c net.Conn) {
		_, _ = io.WriteString(c, addrPort(c.RemoteAddr()).Addr().Unmap().String())
		_ = c.Close()
	})
	// REDIRECT: the connection works and comes from b's own address.
	if got, err := e.readAllFromA("10.78.0.2:8083"); err != nil || got != "10.78.0.2" {
		t.Fatalf("without TPROXY: %q, %v; want a connection from the pod's own address", got, err)
	}
	if _, err := e.tryEcho("10.78.0.2:8080", capture.DefaultMark, "plain"); !isReset(err) {
		t.Fatalf("inbound plaintext without TPROXY: %v, want a reset", err)
	}
	var m dto.Metric
	if err := e.p.m.pods.WithLabelValues(SourceRedirect).Write(&m); err != nil || m.GetGauge().GetValue() != 2 {
		t.Errorf("pods{inbound_source=redirect} = %v, want 2", m.GetGauge().GetValue())
	}
	if n := probes.Load(); n != 1 {
		t.Errorf("TPROXY was probed %d times for two pods of one address family set, want once", n)
	}
	out, err := exec.Command("ip", "netns", "exec", e.b, "iptables-save", "-t", "mangle").CombinedOutput()
	if err != nil || strings.Contains(string(out), "TPROXY") {
		t.Errorf("TPROXY rules installed though the probe said no (%v):\n%s", err, out)
	}
}

// TestSetupFigure gives the cost of a new connection through both proxies
// (connect from pod a, a 1-byte echo with b's application, close), as a
// figure, never a gate: TRUSTMESH_PROXY_FIGURES=1 go test -run TestSetupFigure -v.
func TestSetupFigure(t *testing.T) {
	if os.Getenv("TRUSTMESH_PROXY_FIGURES") == "" {
		t.Skip("a figure, not a test: set TRUSTMESH_PROXY_FIGURES=1")
	}
	e := start(t)
	r := testing.Benchmark(func(b *testing.B) {
		for range b.N {
			if got, err := e.tryEcho("10.78.0.2:8080", 0, "x"); err != nil || got != "x" {
				b.Fatalf("echo: %q, %v", got, err)
			}
		}
	})
	t.Logf("connection setup a→b through both proxies: %v per connection (%d connections)", time.Duration(r.NsPerOp()), r.N)
}
