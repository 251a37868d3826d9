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
	"math/big"
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

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/anypb"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// The no-op floor (-serve-noop): an ADS server that does the least a
// server must to hold this tool's fleet, on serve's transport, so that
// serve's memory and push time can be quoted beside what the transport
// alone costs (bench/xds.sh runs both in one run). It is grpc-go with the
// options serve's CA and xDS port uses (connlimit.GRPCTLSOptions), TLS 1.3
// with the client's chain verified in the handshake (serve verifies it per
// stream), and per stream one goroutine, the handler, waiting in Recv. It
// answers each stream's first request of a type: the clusters, listeners
// and routes with nothing, the endpoints with svc-0's assignment; it
// builds no configuration, checks no identity and keeps no snapshot. It
// polls services.yaml in -mesh every 10 ms (serve's mesh feed settles for
// 250 ms), counts svc-0's endpoints in it, and sends the new assignment,
// encoded once, to every stream that subscribed to endpoints. It enrols
// the tool as serve's CA does (CreateCertificate, the same chain shape),
// signing the request's key with no check, and writes its root to
// -ca-out once it listens.

// noopPollInterval is how often the floor looks at services.yaml.
const noopPollInterval = 10 * time.Millisecond

// noopPushers send a new assignment to the streams in parallel.
const noopPushers = 4

type noopFloor struct {
	discoveryv3.UnimplementedAggregatedDiscoveryServiceServer
	pb.UnimplementedIstioCertificateServiceServer
	inter     *x509.Certificate
	interKey  crypto.Signer
	chainTail []string // the intermediate and the root, PEM

	// cur is svc-0's assignment as every stream is sent it.
	cur atomic.Pointer[noopAssignment]

	mu      sync.Mutex
	streams map[*noopStream]struct{}
}

// noopAssignment is one version of svc-0's assignment, as a delta and as a
// state-of-the-world response.
type noopAssignment struct {
	version int
	delta   *discoveryv3.DeltaDiscoveryResponse
	sotw    *discoveryv3.DiscoveryResponse
}

// noopStream is one ADS stream; mu serialises its sends (the handler's
// answers and the pushers').
type noopStream struct {
	mu   sync.Mutex
	send func(*noopAssignment) error
	eds  bool // it subscribed to endpoints
	sent int  // the version it was last sent
}

func (s *noopStream) push(a *noopAssignment) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.eds && s.sent != a.version {
		if s.send(a) == nil {
			s.sent = a.version
		}
	}
}

func newNoopAssignment(version, endpoints int) (*noopAssignment, error) {
	cla := &endpointv3.ClusterLoadAssignment{ClusterName: svc0Cluster}
	loc := &endpointv3.LocalityLbEndpoints{}
	for j := range endpoints {
		loc.LbEndpoints = append(loc.LbEndpoints, &endpointv3.LbEndpoint{HostIdentifier: &endpointv3.LbEndpoint_Endpoint{Endpoint: &endpointv3.Endpoint{
			Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
				Address: endpointAddr(0, j), PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: servicePort},
			}}},
		}}})
	}
	cla.Endpoints = []*endpointv3.LocalityLbEndpoints{loc}
	a, err := anypb.New(cla)
	if err != nil {
		return nil, fmt.Errorf("xds-load: floor: %w", err)
	}
	v := strconv.Itoa(version)
	return &noopAssignment{
		version: version,
		delta: &discoveryv3.DeltaDiscoveryResponse{TypeUrl: resource.EndpointType, Nonce: v, SystemVersionInfo: v,
			Resources: []*discoveryv3.Resource{{Name: svc0Cluster, Version: v, Resource: a}}},
		sotw: &discoveryv3.DiscoveryResponse{TypeUrl: resource.EndpointType, Nonce: v, VersionInfo: v, Resources: []*anypb.Any{a}},
	}, nil
}

// svc0Endpoints counts svc-0's endpoints in a services.yaml writeMesh wrote.
func svc0Endpoints(yaml string) int { return strings.Count(yaml, "pod: svc-0-") }

func (f *noopFloor) add(s *noopStream) {
	f.mu.Lock()
	f.streams[s] = struct{}{}
	f.mu.Unlock()
}

func (f *noopFloor) remove(s *noopStream) {
	f.mu.Lock()
	delete(f.streams, s)
	f.mu.Unlock()
}

// answer is a stream's answer to its first request of typ: svc-0's
// assignment for endpoints, nothing for the rest.
func (f *noopFloor) answer(s *noopStream, typ string, empty func() error) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if typ != resource.EndpointType {
		return empty()
	}
	s.eds = true
	a := f.cur.Load()
	s.sent = a.version
	return s.send(a)
}

func (f *noopFloor) DeltaAggregatedResources(st grpc.BidiStreamingServer[discoveryv3.DeltaDiscoveryRequest, discoveryv3.DeltaDiscoveryResponse]) error {
	return noopServe(f, st, func(a *noopAssignment) *discoveryv3.DeltaDiscoveryResponse { return a.delta },
		func(typ string) *discoveryv3.DeltaDiscoveryResponse {
			return &discoveryv3.DeltaDiscoveryResponse{TypeUrl: typ, Nonce: "0"}
		})
}

func (f *noopFloor) StreamAggregatedResources(st grpc.BidiStreamingServer[discoveryv3.DiscoveryRequest, discoveryv3.DiscoveryResponse]) error {
	return noopServe(f, st, func(a *noopAssignment) *discoveryv3.DiscoveryResponse { return a.sotw },
		func(typ string) *discoveryv3.DiscoveryResponse {
			return &discoveryv3.DiscoveryResponse{TypeUrl: typ, Nonce: "0", VersionInfo: "0"}
		})
}

// noopRequest is what the floor reads of a request, delta or not.
type noopRequest[T any] interface {
	*T
	GetResponseNonce() string
	GetTypeUrl() string
}

// noopServe is one stream: it answers each first request of a type
// (assignment for endpoints, empty for the rest) and ignores the
// acknowledgements; the pushers send it the new assignments.
func noopServe[Req any, PReq noopRequest[Req], Resp any](f *noopFloor, st grpc.BidiStreamingServer[Req, Resp],
	assignment func(*noopAssignment) *Resp, empty func(typ string) *Resp) error {
	s := &noopStream{send: func(a *noopAssignment) error { return st.Send(assignment(a)) }}
	f.add(s)
	defer f.remove(s)
	for {
		m, err := st.Recv()
		if err != nil {
			return err
		}
		req := PReq(m)
		if req.GetResponseNonce() != "" {
			continue // an acknowledgement
		}
		typ := req.GetTypeUrl()
		if err := f.answer(s, typ, func() error { return st.Send(empty(typ)) }); err != nil {
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

// watch polls services.yaml and pushes each new svc-0 assignment.
func (f *noopFloor) watch(ctx context.Context, path string) {
	var last time.Time
	var size int64
	for {
		select {
		case <-ctx.Done():
			return
		case <-time.After(noopPollInterval):
		}
		fi, err := os.Stat(path)
		if err != nil || (fi.ModTime().Equal(last) && fi.Size() == size) {
			continue
		}
		last, size = fi.ModTime(), fi.Size()
		b, err := os.ReadFile(path)
		if err != nil {
			continue
		}
		cur := f.cur.Load()
		a, err := newNoopAssignment(cur.version+1, svc0Endpoints(string(b)))
		if err != nil {
			continue
		}
		f.cur.Store(a)
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
					streams[i].push(a)
				}
			})
		}
		wg.Wait()
	}
}

// serveNoop serves the floor on addr until SIGINT or SIGTERM.
func serveNoop(addr, meshDir, caOut string) error {
	lis, err := net.Listen("tcp", addr)
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
func startNoop(meshDir, caOut string) (srv *grpc.Server, stopWatch func(), err error) {
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
	b, err := os.ReadFile(filepath.Join(meshDir, "services.yaml"))
	if err != nil {
		return nil, nil, fmt.Errorf("xds-load: floor: %w", err)
	}
	first, err := newNoopAssignment(1, svc0Endpoints(string(b)))
	if err != nil {
		return nil, nil, err
	}
	f := &noopFloor{inter: inter, interKey: interKey, streams: map[*noopStream]struct{}{},
		chainTail: []string{string(pemCert(inter)), string(pemCert(root))}}
	f.cur.Store(first)
	pool := x509.NewCertPool()
	pool.AddCert(root)
	opts := append(connlimit.Config{}.GRPCTLSOptions(), grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion:   tls.VersionTLS12,
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    pool,
		Certificates: []tls.Certificate{{Certificate: [][]byte{serving.Raw, inter.Raw}, PrivateKey: servingKey, Leaf: serving}},
		NextProtos:   []string{"h2"},
	})))
	srv = grpc.NewServer(opts...)
	discoveryv3.RegisterAggregatedDiscoveryServiceServer(srv, f)
	pb.RegisterIstioCertificateServiceServer(srv, f)
	if err := os.WriteFile(caOut+".tmp", pemCert(root), 0o644); err != nil {
		return nil, nil, err
	}
	if err := os.Rename(caOut+".tmp", caOut); err != nil {
		return nil, nil, err
	}
	ctx, cancel := context.WithCancel(context.Background())
	go f.watch(ctx, filepath.Join(meshDir, "services.yaml"))
	return srv, cancel, nil
}

// signCert makes a certificate for pub signed by parent's key
// (self-signed when parent is nil), shaped by set.
func signCert(parent *x509.Certificate, parentKey crypto.Signer, pub crypto.PublicKey, now time.Time, set func(*x509.Certificate)) (*x509.Certificate, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour), BasicConstraintsValid: true}
	set(tmpl)
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
	if err != nil {
		return nil, fmt.Errorf("xds-load: floor: %w", err)
	}
	return x509.ParseCertificate(der)
}

func pemCert(c *x509.Certificate) []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})
}
