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
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/bench/internal/benchpki"
)

// Files the no-op server leaves in its data directory for the client.
const (
	noopRootFile      = "noop-root.pem"
	noopClientFile    = "noop-client.pem"
	noopClientKeyFile = "noop-client-key.pem"
)

// noopCA answers every CreateCertificate with one canned chain, made at
// start: leaf, intermediate and root, the shape trustmesh answers with.
// With a signer it is the signing floor instead: it answers with a leaf
// signed for the CSR's key (signer.sign) before the same intermediate and
// root.
type noopCA struct {
	pb.UnimplementedIstioCertificateServiceServer
	chain  []string
	signer *csrSigner
}

func (n *noopCA) CreateCertificate(_ context.Context, req *pb.IstioCertificateRequest) (*pb.IstioCertificateResponse, error) {
	if n.signer == nil {
		return &pb.IstioCertificateResponse{CertChain: n.chain}, nil
	}
	leaf, err := n.signer.sign([]byte(req.GetCsr()))
	if err != nil {
		return nil, status.Error(codes.InvalidArgument, err.Error())
	}
	leafPEM := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: leaf})
	return &pb.IstioCertificateResponse{CertChain: append([]string{string(leafPEM)}, n.chain[1:]...)}, nil
}

// csrSigner does what the least CA does with a request, and no more: the
// steps of shared/bench's spiffe-mint-load in-process CA. It parses the
// CSR, checks its signature (the proof that the caller holds the key), and
// signs a leaf for that key with crypto/x509, which checks the signature it
// made. It authenticates nobody and records nothing.
type csrSigner struct {
	issuer *x509.Certificate
	key    crypto.Signer
	id     *url.URL
}

func (s *csrSigner) sign(csrPEM []byte) ([]byte, error) {
	b, _ := pem.Decode(csrPEM)
	if b == nil || b.Type != "CERTIFICATE REQUEST" {
		return nil, errors.New("the request holds no PEM CSR")
	}
	csr, err := x509.ParseCertificateRequest(b.Bytes)
	if err != nil {
		return nil, err
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, err
	}
	return benchpki.Sign(s.issuer, s.key, csr.PublicKey, time.Now(), func(t *x509.Certificate) {
		t.URIs = []*url.URL{s.id}
		t.KeyUsage = x509.KeyUsageDigitalSignature
		t.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
	})
}

// serveNoopCA serves the no-op CA on addr until SIGINT or SIGTERM, with a
// root, an intermediate, a serving certificate for localhost and a client
// certificate of its own, the last written to dir for the load's workers.
// With sign it serves the signing floor (csrSigner) instead.
func serveNoopCA(addr, dir string, sign bool) error {
	now := time.Now()
	root, rootKey, err := mintCert(nil, nil, now, func(t *x509.Certificate) {
		t.Subject, t.IsCA, t.KeyUsage = pkix.Name{CommonName: "ca-load no-op root"}, true, x509.KeyUsageCertSign
	})
	if err != nil {
		return err
	}
	inter, interKey, err := mintCert(root, rootKey, now, func(t *x509.Certificate) {
		t.Subject, t.IsCA, t.KeyUsage, t.MaxPathLenZero = pkix.Name{CommonName: "ca-load no-op intermediate"}, true, x509.KeyUsageCertSign, true
	})
	if err != nil {
		return err
	}
	spiffe := func(path string) func(*x509.Certificate) {
		return func(t *x509.Certificate) {
			t.URIs = []*url.URL{{Scheme: "spiffe", Host: "bench.local", Path: path}}
			t.KeyUsage = x509.KeyUsageDigitalSignature
			t.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth}
		}
	}
	serving, servingKey, err := mintCert(inter, interKey, now, func(t *x509.Certificate) {
		spiffe("/trustmesh/ca")(t)
		t.DNSNames, t.IPAddresses = []string{"localhost"}, []net.IP{net.IPv4(127, 0, 0, 1)}
	})
	if err != nil {
		return err
	}
	client, clientKey, err := mintCert(inter, interKey, now, spiffe("/bench/client"))
	if err != nil {
		return err
	}
	canned, _, err := mintCert(inter, interKey, now, spiffe("/bench/w0"))
	if err != nil {
		return err
	}
	keyDER, err := x509.MarshalPKCS8PrivateKey(clientKey)
	if err != nil {
		return err
	}
	files := map[string][]byte{
		noopRootFile:      pemCerts(root),
		noopClientFile:    pemCerts(client, inter),
		noopClientKeyFile: pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: keyDER}),
	}
	// Listen before writing the client's files: a script waits for them
	// as the sign that the server is up.
	lis, err := net.Listen("tcp", addr)
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return err
	}
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			return err
		}
	}
	var chain []string
	for _, c := range []*x509.Certificate{canned, inter, root} {
		chain = append(chain, string(pemCerts(c)))
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(&tls.Config{
		MinVersion:   tls.VersionTLS12,
		ClientAuth:   tls.RequestClientCert,
		Certificates: []tls.Certificate{{Certificate: [][]byte{serving.Raw, inter.Raw}, PrivateKey: servingKey, Leaf: serving}},
		NextProtos:   []string{"h2"},
	})))
	ca := &noopCA{chain: chain}
	if sign {
		ca.signer = &csrSigner{issuer: inter, key: interKey, id: canned.URIs[0]}
	}
	pb.RegisterIstioCertificateServiceServer(srv, ca)
	stop := make(chan os.Signal, 1)
	signal.Notify(stop, syscall.SIGINT, syscall.SIGTERM)
	go func() { <-stop; srv.Stop() }()
	return srv.Serve(lis)
}

// mintCert makes an ECDSA P-256 key and a certificate for it, signed by
// parent (self-signed when parent is nil), shaped by set.
func mintCert(parent *x509.Certificate, parentKey crypto.Signer, now time.Time, set func(*x509.Certificate)) (*x509.Certificate, crypto.Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, nil, err
	}
	if parent == nil {
		parentKey = key
	}
	der, err := benchpki.Sign(parent, parentKey, key.Public(), now, set)
	if err != nil {
		return nil, nil, err
	}
	cert, err := x509.ParseCertificate(der)
	return cert, key, err
}

func pemCerts(certs ...*x509.Certificate) []byte {
	var out []byte
	for _, c := range certs {
		out = append(out, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: c.Raw})...)
	}
	return out
}

type noopMaterial struct {
	roots *x509.CertPool
	key   *ecdsa.PrivateKey
	chain [][]byte
}

// readNoopMaterial reads what serveNoopCA wrote for its clients.
func readNoopMaterial(dir string) (*noopMaterial, error) {
	rootPEM, err := os.ReadFile(filepath.Join(dir, noopRootFile))
	if err != nil {
		return nil, fmt.Errorf("the no-op server's material (is ca-load -serve-noop running?): %w", err)
	}
	pair, err := tls.LoadX509KeyPair(filepath.Join(dir, noopClientFile), filepath.Join(dir, noopClientKeyFile))
	if err != nil {
		return nil, err
	}
	key, ok := pair.PrivateKey.(*ecdsa.PrivateKey)
	if !ok {
		return nil, errors.New("the no-op client key is not ECDSA")
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return nil, errors.New("the no-op root does not parse")
	}
	return &noopMaterial{roots: roots, key: key, chain: pair.Certificate}, nil
}

// clockTicks is USER_HZ, the unit of /proc/<pid>/stat's times: 100 on every
// Linux architecture Go runs on.
const clockTicks = 100

// processCPU is pid's user plus system CPU time so far; zero when pid is 0.
func processCPU(pid int) (time.Duration, error) {
	if pid == 0 {
		return 0, nil
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name, field 2, is in parentheses and may hold spaces;
	// utime and stime are fields 14 and 15.
	s := string(b)
	end := strings.LastIndexByte(s, ')')
	if end < 0 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	f := strings.Fields(s[end+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: unexpected format", pid)
	}
	var ticks int64
	for _, v := range f[11:13] {
		n, err := strconv.ParseInt(v, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc/%d/stat: %w", pid, err)
		}
		ticks += n
	}
	return time.Duration(ticks) * time.Second / clockTicks, nil
}
