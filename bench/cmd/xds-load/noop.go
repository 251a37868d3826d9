package main

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	clusterv3 "github.com/envoyproxy/go-control-plane/envoy/config/cluster/v3"
	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	routev3 "github.com/envoyproxy/go-control-plane/envoy/config/route/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/bench/internal/benchpki"
	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// The no-op floor (-serve-noop): an ADS server that does the least a
// server must to hold this tool's fleet and keep it current, on serve's
// transport, so that serve's memory and push time can be quoted beside
// what the transport alone costs (bench/xds.sh runs both in one run).
//   - Transport: grpc-go with the options of serve's CA and xDS port
//     (connlimit.GRPCTLSOptions, whose codec sends pre-encoded bytes by
//     reference), and TLS that requests the client's certificate without
//     verifying it in the handshake; each stream verifies the chain when it
//     opens, as serve's does (xds/stream.go), before it is answered.
//   - Per stream one goroutine, the handler, waiting in Recv; no snapshot,
//     no identity or node check, no per-stream state beyond the last
//     version it was sent.
//   - What it sends is what any server must send this fleet: for each
//     type, one resource per service (a cluster, an endpoint assignment
//     and a virtual host of route 8080 per service, and a listener), built
//     from services.yaml and encoded once per version into a response's
//     unknown fields, which every stream's response shares. A stream's
//     first request of a type gets all of that type. A change sends svc-0's
//     assignment alone over delta and every assignment over state of the
//     world, as serve does. The resources are minimal (no TLS contexts,
//     filters or policies), so they are smaller than serve's. At most 256
//     streams have first answers not yet acknowledged, as serve bounds
//     the nodes being sent a first configuration, delta or state of the
//     world.
//   - It polls services.yaml every 10 ms, and after a change waits as
//     serve does (its mesh feed's 250 ms settle and its 10 ms xDS
//     debounce), so that a round's convergence compares the work after the
//     wait.
//   - It enrols the tool as serve's CA does (CreateCertificate, the same
//     chain shape), signing the request's key with no check, and writes
//     its root to -ca-out once it listens.

const (
	// noopPollInterval is how often the floor looks at services.yaml.
	noopPollInterval = 10 * time.Millisecond
	// noopWait is serve's wait after a mesh change: mesh.DefaultSettle
	// plus the xDS debounce controlplane sets.
	noopWait = 260 * time.Millisecond
	// noopPushers send a new version to the streams in parallel.
	noopPushers = 4
	// noopFirstAnswers bounds the streams with first answers not yet
	// acknowledged, as serve bounds the nodes being sent a first
	// configuration (xds.DefaultInitialPushes, held until the node
	// acknowledges): a Send returns once the message is queued, so without
	// it a cold connect of 20,000 clients queues every first answer at
	// once, gigabytes into the kernel's socket buffers, and loopback TCP
	// under memory pressure drops segments and times connections out.
	noopFirstAnswers = 256
	// noopFirstHold is how long a stream may hold its place without
	// acknowledging (xds.DefaultFirstPushHold).
	noopFirstHold = 10 * time.Second
)

type noopFloor struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	pb.UnimplementedIstioCertificateServiceServer
	inter     *x509.Certificate
	interKey  crypto.Signer
	chainTail []string // the intermediate and the root, PEM
	roots     *x509.CertPool

	// cur is the configuration every stream is sent.
	cur atomic.Pointer[noopConfig]
	// first holds a slot per first answer being sent.
	first chan struct{}

	mu      sync.Mutex
	streams map[*noopStream]struct{}
}

// noopConfig is one version of the floor's configuration: per type, its
// resources encoded as a delta and as a state-of-the-world response's
// resources field, and svc-0's assignment alone for a delta push.
type noopConfig struct {
	version       int
	delta, sotw   map[string][]byte
	svc0Delta     []byte
	versionString string
}

// noopStream is one ADS stream; mu serialises its sends (the handler's
// answers and the pushers').
type noopStream struct {
	mu     sync.Mutex
	delta  bool
	send   func(typ string, resources []byte) error
	eds    bool // it subscribed to endpoints
	sent   int  // the version it was last sent
	closed bool // its handler returned
	// holding: it holds a place in noopFloor.first (holdGen numbers the
	// takings); unacked counts its answers not yet acknowledged.
	holding          bool
	holdGen, unacked int
}

// push sends the stream what changed from the version it holds to c:
// svc-0's assignment (delta) or every assignment (state of the world).
func (s *noopStream) push(c *noopConfig) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.closed || !s.eds || s.sent >= c.version {
		return
	}
	b := c.sotw[resource.EndpointType]
	if s.delta {
		b = c.svc0Delta
	}
	if s.send(resource.EndpointType, b) == nil {
		s.sent = c.version
	}
}

// newNoopConfig builds the resources of a services.yaml that writeMesh
// wrote: its services, with svc0 endpoints on svc-0 and two on the rest.
func newNoopConfig(version, services, svc0 int) (*noopConfig, error) {
	byType := map[string][]proto.Message{}
	names := map[string][]string{}
	add := func(typ, name string, m proto.Message) {
		byType[typ] = append(byType[typ], m)
		names[typ] = append(names[typ], name)
	}
	vhosts := make([]*routev3.VirtualHost, 0, services)
	var svc0CLA *endpointv3.ClusterLoadAssignment
	for i := range services {
		host := fmt.Sprintf("svc-%d.%s.svc.cluster.local", i, meshNS)
		cluster := fmt.Sprintf("outbound|%d||%s", servicePort, host)
		add(resource.ClusterType, cluster, &clusterv3.Cluster{Name: cluster,
			ClusterDiscoveryType: &clusterv3.Cluster_Type{Type: clusterv3.Cluster_EDS},
			EdsClusterConfig: &clusterv3.Cluster_EdsClusterConfig{EdsConfig: &corev3.ConfigSource{
				ConfigSourceSpecifier: &corev3.ConfigSource_Ads{Ads: &corev3.AggregatedConfigSource{}}}}})
		n := 2
		if i == 0 {
			n = svc0
		}
		cla := &endpointv3.ClusterLoadAssignment{ClusterName: cluster, Endpoints: []*endpointv3.LocalityLbEndpoints{{}}}
		for j := range n {
			cla.Endpoints[0].LbEndpoints = append(cla.Endpoints[0].LbEndpoints, &endpointv3.LbEndpoint{
				HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
					Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
						Address: endpointAddr(i, j), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: servicePort}}}}}}})
		}
		if i == 0 {
			svc0CLA = cla
		}
		add(resource.EndpointType, cluster, cla)
		vhosts = append(vhosts, &routev3.VirtualHost{Name: host, Domains: []string{host, fmt.Sprintf("%s:%d", host, servicePort)},
			Routes: []*routev3.Route{{Match: &routev3.RouteMatch{PathSpecifier: &routev3.RouteMatch_Prefix{Prefix: "/"}},
				Action: &routev3.Route_Route{Route: &routev3.RouteAction{ClusterSpecifier: &routev3.RouteAction_Cluster{Cluster: cluster}}}}}})
	}
	add(resource.RouteType, "8080", &routev3.RouteConfiguration{Name: "8080", VirtualHosts: vhosts})
	add(resource.ListenerType, "virtualOutbound", &listenerv3.Listener{Name: "virtualOutbound",
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: "0.0.0.0", PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: 15001}}}}})
	v := strconv.Itoa(version)
	c := &noopConfig{version: version, versionString: v, delta: map[string][]byte{}, sotw: map[string][]byte{}}
	for typ, ms := range byType {
		var rs []*discoveryv3.Resource
		var as []*anypb.Any
		for i, m := range ms {
			a, err := anypb.New(m)
			if err != nil {
				return nil, fmt.Errorf("xds-load: floor: %w", err)
			}
			as = append(as, a)
			rs = append(rs, &discoveryv3.Resource{Name: names[typ][i], Version: v, Resource: a})
			if m == proto.Message(svc0CLA) {
				b, err := proto.Marshal(&discoveryv3.DeltaDiscoveryResponse{Resources: []*discoveryv3.Resource{rs[i]}})
				if err != nil {
					return nil, fmt.Errorf("xds-load: floor: %w", err)
				}
				c.svc0Delta = b
			}
		}
		var err error
		if c.delta[typ], err = proto.Marshal(&discoveryv3.DeltaDiscoveryResponse{Resources: rs}); err != nil {
			return nil, fmt.Errorf("xds-load: floor: %w", err)
		}
		if c.sotw[typ], err = proto.Marshal(&discoveryv3.DiscoveryResponse{Resources: as}); err != nil {
			return nil, fmt.Errorf("xds-load: floor: %w", err)
		}
	}
	return c, nil
}

// readNoopConfig builds version version of the configuration from the
// services.yaml at path.
func readNoopConfig(path string, version int) (*noopConfig, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("xds-load: floor: %w", err)
	}
	yaml := string(b)
	return newNoopConfig(version, strings.Count(yaml, "kind: Service\n"), strings.Count(yaml, "pod: svc-0-"))
}

func (f *noopFloor) add(s *noopStream) {
	f.mu.Lock()
	f.streams[s] = struct{}{}
	f.mu.Unlock()
}

func (f *noopFloor) remove(s *noopStream) {
	f.mu.Lock()
	delete(f.streams, s)
	f.mu.Unlock()
	s.mu.Lock()
	s.closed = true
	s.mu.Unlock()
}

// answer is a stream's answer to its first request of typ: every resource
// of the type at the current version.
func (f *noopFloor) answer(s *noopStream, typ string) error {
	s.mu.Lock()
	holding := s.holding
	s.mu.Unlock()
	if !holding {
		// A stream takes its place before its first answers and gives it
		// back once it has acknowledged them all (ack), or at the hold
		// time; it never waits for a place while it holds one. Only the
		// handler's goroutine takes one.
		f.first <- struct{}{}
		s.mu.Lock()
		s.holding = true
		s.holdGen++
		gen := s.holdGen
		s.mu.Unlock()
		time.AfterFunc(noopFirstHold, func() { s.releaseIf(f, gen) })
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	c := f.cur.Load()
	b := c.sotw[typ]
	if s.delta {
		b = c.delta[typ]
	}
	if typ == resource.EndpointType {
		s.eds = true
		s.sent = c.version
	}
	s.unacked++
	return s.send(typ, b)
}

// ack notes an acknowledgement; the last one of the answers sent while
// the stream held its place gives the place back. The handler's goroutine
// calls it.
func (s *noopStream) ack(f *noopFloor) {
	s.mu.Lock()
	if s.unacked > 0 {
		s.unacked--
	}
	done := s.unacked == 0
	gen := s.holdGen
	s.mu.Unlock()
	if done {
		s.releaseIf(f, gen)
	}
}

// releaseIf gives the stream's place back if it still holds the one it
// took as gen.
func (s *noopStream) releaseIf(f *noopFloor, gen int) {
	s.mu.Lock()
	release := s.holding && s.holdGen == gen
	if release {
		s.holding = false
	}
	s.mu.Unlock()
	if release {
		<-f.first
	}
}

// verifyPeer verifies the stream's client chain against the floor's root,
// as serve verifies each stream's.
func (f *noopFloor) verifyPeer(ctx context.Context) error {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return status.Error(codes.Unauthenticated, "xds-load: floor: no peer")
	}
	info, ok := p.AuthInfo.(credentials.TLSInfo)
	if !ok || len(info.State.PeerCertificates) == 0 {
		return status.Error(codes.Unauthenticated, "xds-load: floor: no client certificate")
	}
	chain := info.State.PeerCertificates
	inter := x509.NewCertPool()
	for _, c := range chain[1:] {
		inter.AddCert(c)
	}
	if _, err := chain[0].Verify(x509.VerifyOptions{Roots: f.roots, Intermediates: inter,
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		return status.Errorf(codes.Unauthenticated, "xds-load: floor: %v", err)
	}
	return nil
}

func (f *noopFloor) DeltaAggregatedResources(st grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	return noopServe(f, st, true, func(typ, version string, resources []byte) *discoveryv3.DeltaDiscoveryResponse {
		r := &discoveryv3.DeltaDiscoveryResponse{TypeUrl: typ, Nonce: version, SystemVersionInfo: version}
		r.ProtoReflect().SetUnknown(resources)
		return r
	})
}

func (f *noopFloor) StreamAggregatedResources(st grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	return noopServe(f, st, false, func(typ, version string, resources []byte) *discoveryv3.DiscoveryResponse {
		r := &discoveryv3.DiscoveryResponse{TypeUrl: typ, Nonce: version, VersionInfo: version}
		r.ProtoReflect().SetUnknown(resources)
		return r
	})
}

// noopRequest is what the floor reads of a request, delta or not.
type noopRequest[T any] interface {
	*T
	GetResponseNonce() string
	GetTypeUrl() string
}

// noopServe is one stream: it verifies the client's chain once the first
// request is in, answers each first request of a type, and ignores the
// acknowledgements; the pushers send it the new versions.
func noopServe[Req any, PReq noopRequest[Req], Resp any](f *noopFloor, st grpc.BidiStreamingServer[Req, Resp], delta bool,
	response func(typ, version string, resources []byte) *Resp) error {
	s := &noopStream{delta: delta}
	s.send = func(typ string, resources []byte) error {
		return st.Send(response(typ, f.cur.Load().versionString, resources))
	}
	for first := true; ; first = false {
		m, err := st.Recv()
		if err != nil {
			return err
		}
		if first {
			// After the first message, as serve's streams: go-control-plane
			// receives on a goroutine of its own while serve verifies the
			// stream's chain, and the port's arrival guard counts a stream
			// until its first message is read.
			if err := f.verifyPeer(st.Context()); err != nil {
				return err
			}
			f.add(s)
			defer f.remove(s)
			defer func() { s.releaseIf(f, s.holdGen) }()
		}
		req := PReq(m)
		if req.GetResponseNonce() != "" {
			s.ack(f) // an acknowledgement
			continue
		}
		if err := f.answer(s, req.GetTypeUrl()); err != nil {
			return err
		}
	}
}

// CreateCertificate signs the request's key for the tool's SPIFFE ID,
// with no check of who asks: the floor's enrolment is set-up, not
// measured.
func (f *noopFloor) CreateCertificate(_ context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	blk, _ := pem.Decode([]byte(req.GetCsr()))
	if blk == nil {
		return nil, errors.New("xds-load: floor: the CSR is not PEM")
	}
	csr, err := x509.ParseCertificateRequest(blk.Bytes)
	if err != nil {
		return nil, fmt.Errorf("xds-load: floor: %w", err)
	}
	leaf, err := signCert(f.inter, f.interKey, csr.PublicKey, time.Now(), func(t *x509.Certificate) {
		t.URIs = []*url.URL{{Scheme: "spiffe", Host: "cluster.local", Path: "/ns/" + meshNS + "/sa/client"}}
		t.KeyUsage = x509.KeyUsageDigitalSignature
		t.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	})
	if err != nil {
		return nil, err
	}
	return &pb.IstioCertificateResponse{CertChain: append([]string{string(pemCert(leaf))}, f.chainTail...)}, nil
}

// watch polls services.yaml from the state at start, and after each
// change waits as serve does, builds the next version from the file as it
// is then, and pushes it.
func (f *noopFloor) watch(ctx context.Context, path string, at os.FileInfo) {
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(noopPollInterval):
		}
		fi, err := os.Stat(path)
		if err != nil || os.SameFile(fi, at) && fi.ModTime().Equal(at.ModTime()) && fi.Size() == at.Size() {
			continue
		}
		select {
		case <-ctx.Done():
			return
		case <-time.After(noopWait):
		}
		if at, err = os.Stat(path); err != nil {
			continue
		}
		c, err := readNoopConfig(path, f.cur.Load().version+1)
		if err != nil {
			continue
		}
		f.cur.Store(c)
		f.mu.Lock()
		streams := make([]*noopStream, 0, len(f.streams))
		for s := range f.streams {
			streams = append(streams, s)
		}
		f.mu.Unlock()
		var wg sync.WaitGroup
		for w := range noopPushers {
			wg.Go(func() {
				for i := w; i < len(streams); i += noopPushers {
					streams[i].push(c)
				}
			})
		}
		wg.Wait()
	}
}

// serveNoop serves the floor on addr until SIGINT or SIGTERM.
func serveNoop(addr, meshDir, caOut string) error {
	// serve's listener is connlimit's, whose connections are not
	// *net.TCPConn, so grpc-go sets no TCP_USER_TIMEOUT on them; on a bare
	// listener it would set its keepalive time-out (10 s), and the kernel
	// would abort a connection whose client has not read for that long,
	// which a loaded client at 20,000 proxies does. The limit is serve's
	// own shape, high enough never to wait.
	lis, err := connlimit.Config{MaxConnections: 1 << 20}.Listen("tcp", addr)
	if err != nil {
		return err
	}
	srv, stopWatch, err := startNoop(meshDir, caOut)
	if err != nil {
		lis.Close()
		return err
	}
	defer stopWatch()
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-stop; srv.Stop() }()
	return srv.Serve(lis)
}

// startNoop makes the floor's server, writes its root to caOut
// and starts its watch of meshDir, which stopWatch ends.
func startNoop(meshDir, caOut string, extra ...grpc.ServerOption) (srv *grpc.Server, stopWatch func(), err error) {
	now := time.Now()
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	root, err := signCert(nil, rootKey, rootKey.Public(), now, func(t *x509.Certificate) {
		t.Subject, t.IsCA, t.KeyUsage = pkix.Name{CommonName: "xds-load floor root"}, true, x509.KeyUsageCertSign
	})
	if err != nil {
		return nil, nil, err
	}
	interKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	inter, err := signCert(root, rootKey, interKey.Public(), now, func(t *x509.Certificate) {
		t.Subject, t.IsCA, t.KeyUsage, t.MaxPathLenZero = pkix.Name{CommonName: "xds-load floor intermediate"}, true, x509.KeyUsageCertSign, true
	})
	if err != nil {
		return nil, nil, err
	}
	servingKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	serving, err := signCert(inter, interKey, servingKey.Public(), now, func(t *x509.Certificate) {
		t.DNSNames, t.IPAddresses = []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)}
		t.KeyUsage, t.ExtKeyUsage = x509.KeyUsageDigitalSignature, []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	})
	if err != nil {
		return nil, nil, err
	}
	path := filepath.Join(meshDir, "services.yaml")
	at, err := os.Stat(path)
	if err != nil {
		return nil, nil, fmt.Errorf("xds-load: floor: %w", err)
	}
	first, err := readNoopConfig(path, 1)
	if err != nil {
		return nil, nil, err
	}
	pool := x509.NewCertPool()
	pool.AddCert(root)
	f := &noopFloor{inter: inter, interKey: interKey, streams: map[*noopStream]struct{}{}, roots: pool, first: make(chan struct{}, noopFirstAnswers),
		chainTail: []string{string(pemCert(inter)), string(pemCert(root))}}
	f.cur.Store(first)
	opts := append(connlimit.Config{}.GRPCTLSOptions(), grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion: tls.VersionTLS12,
		// As serve's port: the certificate is requested here and verified
		// per stream (verifyPeer).
		ClientAuth:   tls.RequestClientCert,
		Certificates: []tls.Certificate{{Certificate: [][]byte{serving.Raw, inter.Raw}, PrivateKey: servingKey, Leaf: serving}},
		NextProtos:   []string{"h2"},
	})))
	srv = grpc.NewServer(append(opts, extra...)...)
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(srv, f)
	pb.RegisterIstioCertificateServiceServer(srv, f)
	if err := os.WriteFile(caOut+".tmp", pemCert(root), 0o644); err != nil {
		return nil, nil, err
	}
	if err := os.Rename(caOut+".tmp", caOut); err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	go f.watch(ctx, path, at)
	return srv, cancel, nil
}

// signCert makes a certificate for pub signed by parent's key
// (self-signed when parent is nil), shaped by set.
func signCert(parent *x509.Certificate, parentKey crypto.Signer, pub crypto.PublicKey, now time.Time, set func(*x509.Certificate)) (*x509.Certificate, error) {
	der, err := benchpki.Sign(parent, parentKey, pub, now, set)
	if err != nil {
		return nil, fmt.Errorf("xds-load: floor: %w", err)
	}
	return x509.ParseCertificate(der)
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}
