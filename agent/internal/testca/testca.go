// Package testca is a small certificate authority for the agent's tests. It
// speaks the trustmesh CA's wire API (Istio's CreateCertificate and the
// trust-bundle stream) over TLS on loopback, so the agent's client, rotation
// and servers can be exercised before and beside the real CA. It checks the
// credentials the way the wire API promises (bearer token for the first
// issuance, client certificate for renewal), and it can be taken down, brought
// back, and told to misbehave.
package testca

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
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// Authority is a root and an intermediate that signs workload certificates.
type Authority struct {
	TrustDomain spiffeid.TrustDomain
	Root        *x509.Certificate
	rootKey     crypto.Signer
	Inter       *x509.Certificate
	interKey    crypto.Signer
}

// NewAuthority creates a root and an intermediate valid around now.
func NewAuthority(td spiffeid.TrustDomain, now time.Time) (*Authority, error) {
	rootKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	root, err := sign(&x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"testca"}, CommonName: "root " + randomName()},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(10 * 365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}, nil, rootKey.Public(), rootKey)
	if err != nil {
		return nil, err
	}
	interKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	inter, err := sign(&x509.Certificate{
		Subject:               pkix.Name{Organization: []string{"testca"}, CommonName: "intermediate"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(365 * 24 * time.Hour),
		IsCA:                  true,
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageCertSign | x509.KeyUsageCRLSign,
		URIs:                  []*url.URL{td.ID().URL()},
	}, root, interKey.Public(), rootKey)
	if err != nil {
		return nil, err
	}
	return &Authority{TrustDomain: td, Root: root, rootKey: rootKey, Inter: inter, interKey: interKey}, nil
}

// Bundle returns a bundle holding only this authority's root.
func (a *Authority) Bundle() *x509bundle.Bundle {
	return x509bundle.FromX509Authorities(a.TrustDomain, []*x509.Certificate{a.Root})
}

// RootPEM returns the root as PEM.
func (a *Authority) RootPEM() []byte {
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: a.Root.Raw})
}

// SignCSR issues a workload certificate for id to the key in the PEM CSR,
// valid from notBefore for ttl, and returns leaf, intermediate and root.
func (a *Authority) SignCSR(csrPEM []byte, id spiffeid.ID, notBefore time.Time, ttl time.Duration) ([]*x509.Certificate, error) {
	block, _ := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("testca: CSR is not PEM")
	}
	csr, err := x509.ParseCertificateRequest(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("testca: %w", err)
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, fmt.Errorf("testca: %w", err)
	}
	return a.Issue(csr.PublicKey, id, notBefore, ttl)
}

// Issue issues a workload certificate for id to pub.
func (a *Authority) Issue(pub crypto.PublicKey, id spiffeid.ID, notBefore time.Time, ttl time.Duration) ([]*x509.Certificate, error) {
	leaf, err := sign(&x509.Certificate{
		NotBefore:             notBefore,
		NotAfter:              notBefore.Add(ttl),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageKeyEncipherment,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		URIs:                  []*url.URL{id.URL()},
	}, a.Inter, pub, a.interKey)
	if err != nil {
		return nil, err
	}
	return []*x509.Certificate{leaf, a.Inter, a.Root}, nil
}

// ServingCertificate returns a TLS server certificate for the given names,
// chained through the intermediate.
func (a *Authority) ServingCertificate(now time.Time, dnsNames []string, ips []net.IP) (tls.Certificate, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	leaf, err := sign(&x509.Certificate{
		Subject:               pkix.Name{CommonName: "testca serving"},
		NotBefore:             now.Add(-time.Hour),
		NotAfter:              now.Add(24 * time.Hour),
		BasicConstraintsValid: true,
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		DNSNames:              dnsNames,
		IPAddresses:           ips,
	}, a.Inter, key.Public(), a.interKey)
	if err != nil {
		return tls.Certificate{}, err
	}
	return tls.Certificate{Certificate: [][]byte{leaf.Raw, a.Inter.Raw}, PrivateKey: key, Leaf: leaf}, nil
}

var serial = struct {
	sync.Mutex
	n int64
}{}

func sign(tmpl, parent *x509.Certificate, pub crypto.PublicKey, key crypto.Signer) (*x509.Certificate, error) {
	serial.Lock()
	serial.n++
	tmpl.SerialNumber = big.NewInt(serial.n)
	serial.Unlock()
	if parent == nil {
		parent = tmpl
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, parent, pub, key)
	if err != nil {
		return nil, fmt.Errorf("testca: %w", err)
	}
	return x509.ParseCertificate(der)
}

func randomName() string {
	b := make([]byte, 4)
	_, _ = rand.Read(b)
	return fmt.Sprintf("%x", b)
}

// Call records one CreateCertificate call the server answered.
type Call struct {
	// Token is the bearer token, if one was sent.
	Token string
	// ClientID is the SPIFFE ID of the verified client certificate, if one
	// was presented.
	ClientID spiffeid.ID
	// Issued is the ID the certificate was issued to; zero when refused.
	Issued spiffeid.ID
	// Code is the gRPC code returned.
	Code codes.Code
}

// ServerConfig configures a Server.
type ServerConfig struct {
	Authority *Authority
	// Now is the time the server issues at.
	Now func() time.Time
	// Tokens maps each accepted bearer token to the identity it yields.
	// Tokens here may be used any number of times.
	Tokens map[string]spiffeid.ID
	// DefaultTTL is used when the request asks for none.
	DefaultTTL time.Duration
	// Register, if set, registers more services on the server (the node
	// agent's tests add the node service), beside the CA's own.
	Register func(*grpc.Server)
}

// Server serves the CA's wire API on a loopback TCP port. Stop and Start
// take it down and bring it back on the same address.
type Server struct {
	cfg  ServerConfig
	addr string

	mu       sync.Mutex
	grpc     *grpc.Server
	done     chan struct{}
	calls    []Call
	override spiffeid.ID
	bundle   *cav1.TrustBundle
	bundleCh chan struct{}
	streams  int
}

// NewServer starts a server on 127.0.0.1 at a free port.
func NewServer(cfg ServerConfig) (*Server, error) {
	if cfg.DefaultTTL == 0 {
		cfg.DefaultTTL = time.Hour
	}
	s := &Server{cfg: cfg, bundleCh: make(chan struct{})}
	s.bundle = &cav1.TrustBundle{
		TrustDomain:        cfg.Authority.TrustDomain.Name(),
		X509Authorities:    [][]byte{cfg.Authority.Root.Raw},
		SequenceNumber:     1,
		RefreshHintSeconds: 300,
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	s.addr = lis.Addr().String()
	s.serve(lis)
	return s, nil
}

// Addr returns host:port.
func (s *Server) Addr() string { return s.addr }

func (s *Server) serve(lis net.Listener) {
	cert, err := s.cfg.Authority.ServingCertificate(s.cfg.Now(), []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)})
	if err != nil {
		panic(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(s.cfg.Authority.Root)
	creds := credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert},
		ClientAuth:   tls.VerifyClientCertIfGiven,
		ClientCAs:    pool,
		MinVersion:   tls.VersionTLS12,
		Time:         s.cfg.Now,
	})
	g := grpc.NewServer(grpc.Creds(creds))
	pb.RegisterIstioCertificateServiceServer(g, &issuer{s: s})
	cav1.RegisterTrustBundleServiceServer(g, &bundler{s: s})
	if s.cfg.Register != nil {
		s.cfg.Register(g)
	}
	done := make(chan struct{})
	s.grpc, s.done = g, done
	go func() {
		defer close(done)
		_ = g.Serve(lis)
	}()
}

// Stop takes the server down: open streams end and new connections are
// refused until Start.
func (s *Server) Stop() {
	s.mu.Lock()
	g, done := s.grpc, s.done
	s.grpc = nil
	s.mu.Unlock()
	if g == nil {
		return
	}
	g.Stop()
	<-done
}

// Start brings a stopped server back on the same address.
func (s *Server) Start() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.grpc != nil {
		return nil
	}
	lis, err := net.Listen("tcp", s.addr)
	if err != nil {
		return err
	}
	s.serve(lis)
	return nil
}

// SetIdentityOverride makes the server issue every later certificate to id
// instead of the caller's identity, as a compromised or misconfigured CA
// would. The zero ID restores correct behaviour.
func (s *Server) SetIdentityOverride(id spiffeid.ID) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.override = id
}

// SetBundleAuthorities replaces the streamed bundle's roots and pushes it.
func (s *Server) SetBundleAuthorities(roots ...*x509.Certificate) {
	s.mu.Lock()
	defer s.mu.Unlock()
	ders := make([][]byte, len(roots))
	for i, r := range roots {
		ders[i] = r.Raw
	}
	s.bundle = &cav1.TrustBundle{
		TrustDomain:        s.bundle.TrustDomain,
		X509Authorities:    ders,
		SequenceNumber:     s.bundle.SequenceNumber + 1,
		RefreshHintSeconds: s.bundle.RefreshHintSeconds,
	}
	close(s.bundleCh)
	s.bundleCh = make(chan struct{})
}

// Calls returns the CreateCertificate calls answered so far.
func (s *Server) Calls() []Call {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Call(nil), s.calls...)
}

// BundleStreams returns how many bundle streams are open.
func (s *Server) BundleStreams() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.streams
}

type issuer struct {
	pb.UnimplementedIstioCertificateServiceServer
	s *Server
}

func (i *issuer) CreateCertificate(ctx context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	call := Call{}
	resp, err := i.create(ctx, req, &call)
	call.Code = status.Code(err)
	i.s.mu.Lock()
	i.s.calls = append(i.s.calls, call)
	i.s.mu.Unlock()
	return resp, err
}

func (i *issuer) create(ctx context.Context, req *pb.IstioCertificateRequest, call *Call) (*pb.IstioCertificateResponse, error) {
	var id spiffeid.ID
	if md, ok := metadata.FromIncomingContext(ctx); ok {
		for _, v := range md.Get("authorization") {
			if tok, ok := strings.CutPrefix(v, "Bearer "); ok {
				call.Token = tok
			}
		}
	}
	if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.VerifiedChains) > 0 {
			cid, err := x509svid.IDFromCert(ti.State.VerifiedChains[0][0])
			if err == nil {
				call.ClientID = cid
			}
		}
	}
	switch {
	case call.Token != "":
		tid, ok := i.s.cfg.Tokens[call.Token]
		if !ok {
			// As the CA refuses a join token it never created: with the
			// api/ca/v1 reason, which alone tells an agent to stop.
			st, err := status.New(codes.Unauthenticated, "authentication failed: the join token was refused").
				WithDetails(&errdetails.ErrorInfo{Domain: cav1.ErrorDomain, Reason: cav1.JoinTokenUnknown})
			if err != nil {
				return nil, err
			}
			return nil, st.Err()
		}
		id = tid
	case !call.ClientID.IsZero():
		id = call.ClientID
	default:
		return nil, status.Error(codes.Unauthenticated, "authentication failed")
	}
	i.s.mu.Lock()
	if !i.s.override.IsZero() {
		id = i.s.override
	}
	i.s.mu.Unlock()
	ttl := time.Duration(req.GetValidityDuration()) * time.Second
	if ttl <= 0 {
		ttl = i.s.cfg.DefaultTTL
	}
	chain, err := i.s.cfg.Authority.SignCSR([]byte(req.GetCsr()), id, i.s.cfg.Now(), ttl)
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	call.Issued = id
	out := make([]string, len(chain))
	for j, c := range chain {
		out[j] = string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}))
	}
	return &pb.IstioCertificateResponse{CertChain: out}, nil
}

type bundler struct {
	cav1.UnimplementedTrustBundleServiceServer
	s *Server
}

func (b *bundler) WatchBundle(_ *cav1.WatchBundleRequest, stream grpc.ServerStreamingServer[cav1.TrustBundle]) error {
	b.s.mu.Lock()
	b.s.streams++
	b.s.mu.Unlock()
	defer func() {
		b.s.mu.Lock()
		b.s.streams--
		b.s.mu.Unlock()
	}()
	for {
		b.s.mu.Lock()
		bundle, changed := b.s.bundle, b.s.bundleCh
		b.s.mu.Unlock()
		if err := stream.Send(bundle); err != nil {
			return err
		}
		select {
		case <-changed:
		case <-stream.Context().Done():
			return nil
		}
	}
}
