package controlplane_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"database/sql"
	"encoding/hex"
	"encoding/pem"
	"io"
	"log/slog"
	"net/http"
	"net/url"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/controlplane"
)

// env is a running control plane on loopback with a fake clock.
type env struct {
	t       *testing.T
	cp      *controlplane.ControlPlane
	clock   *clocktesting.FakeClock
	dataDir string
	jo      admin.JournalOptions
	stop    func() error
}

func start(t *testing.T, mutate func(*controlplane.Config)) *env {
	t.Helper()
	clk := clocktesting.NewFakeClock(time.Now().Truncate(time.Second))
	cfg := controlplane.Config{
		DataDir: t.TempDir(),
		Listen: controlplane.ListenConfig{
			CA: "127.0.0.1:0", Monitoring: "127.0.0.1:0", Injector: "127.0.0.1:0", Authz: "127.0.0.1:0",
		},
		Kubernetes: controlplane.KubernetesConfig{Mode: controlplane.KubernetesOff},
		Clock:      clk,
		Log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
	}
	if mutate != nil {
		mutate(&cfg)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cp, err := controlplane.New(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cp.Run(ctx) }()
	e := &env{t: t, cp: cp, clock: clk, dataDir: cfg.DataDir, jo: admin.JournalOptions{DSN: cfg.Journal.DSN}}
	if cfg.CA.Secret != "" {
		e.jo.CheckpointSecret = cfg.CA.Secret + "-checkpoint"
		// The test's own client, not counted among the control plane's.
		kc := rest.CopyConfig(cfg.Kubernetes.RestConfig)
		kc.WrapTransport = nil
		e.jo.Kube = kubernetes.NewForConfigOrDie(kc)
	}
	var stopped bool
	var stopErr error
	e.stop = func() error {
		if !stopped {
			stopped = true
			cancel()
			stopErr = <-done
		}
		return stopErr
	}
	t.Cleanup(func() {
		if err := e.stop(); err != nil {
			t.Errorf("control plane Run() = %v", err)
		}
	})
	return e
}

// client is a workload: a key and, once issued, a certificate chain.
type client struct {
	key   crypto.Signer
	chain []*x509.Certificate
}

func newClient(t *testing.T) *client {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &client{key: k}
}

func (c *client) csr(t *testing.T, id string) string {
	t.Helper()
	tmpl := &x509.CertificateRequest{}
	if id != "" {
		u, err := url.Parse(id)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, c.key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// dial connects to the CA as a workload would: trusting the bundle, and
// presenting the client's certificate when it has one. The handshake checks
// time against the fake clock, as the CA does.
func (e *env) dial(c *client, serverName string) pb.IstioCertificateServiceClient {
	e.t.Helper()
	roots := x509.NewCertPool()
	for _, r := range e.cp.Authority().Current().Roots {
		roots.AddCert(r)
	}
	cfg := &tls.Config{RootCAs: roots, ServerName: serverName, Time: e.clock.Now, MinVersion: tls.VersionTLS12}
	if c != nil && c.chain != nil {
		cert := tls.Certificate{PrivateKey: c.key, Leaf: c.chain[0]}
		for _, x := range c.chain {
			cert.Certificate = append(cert.Certificate, x.Raw)
		}
		cfg.Certificates = []tls.Certificate{cert}
	}
	conn, err := grpc.NewClient(e.cp.Addrs().CA.String(), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		e.t.Fatal(err)
	}
	e.t.Cleanup(func() { conn.Close() })
	return pb.NewIstioCertificateServiceClient(conn)
}

// request asks for a certificate the way istio-agent does: the CSR and a
// lifetime, with "Authorization: Bearer <token>" and "ClusterID" metadata
// when it has a token.
func request(ctx context.Context, cl pb.IstioCertificateServiceClient, token, csr string, ttl time.Duration) (*pb.IstioCertificateResponse, error) {
	if token != "" {
		ctx = metadata.NewOutgoingContext(ctx, metadata.Pairs("Authorization", "Bearer "+token, "ClusterID", "Kubernetes"))
	}
	return cl.CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: csr, ValidityDuration: int64(ttl / time.Second)})
}

// obtain requests a certificate, checks the response's shape and identity,
// and keeps it as the client's current certificate.
func (e *env) obtain(c *client, token string, want spiffeid.ID) {
	e.t.Helper()
	resp, err := request(context.Background(), e.dial(c, "localhost"), token, c.csr(e.t, ""), time.Hour)
	if err != nil {
		e.t.Fatalf("CreateCertificate() = %v", err)
	}
	c.chain = e.checkResponse(resp, want)
}

// checkResponse verifies a response as a relying party: leaf, intermediate,
// root; the leaf chains to the bundle and names want.
func (e *env) checkResponse(resp *pb.IstioCertificateResponse, want spiffeid.ID) []*x509.Certificate {
	e.t.Helper()
	var certs []*x509.Certificate
	for _, p := range resp.GetCertChain() {
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			e.t.Fatalf("chain element is not PEM: %q", p)
		}
		c, err := x509.ParseCertificate(b.Bytes)
		if err != nil {
			e.t.Fatal(err)
		}
		certs = append(certs, c)
	}
	if len(certs) != 3 {
		e.t.Fatalf("chain has %d certificates, want leaf, intermediate and root", len(certs))
	}
	root := certs[2]
	if !root.Equal(e.cp.Authority().Current().Roots[0]) {
		e.t.Fatal("the last element of the chain is not the root")
	}
	roots, inter := x509.NewCertPool(), x509.NewCertPool()
	roots.AddCert(root)
	inter.AddCert(certs[1])
	if _, err := certs[0].Verify(x509.VerifyOptions{Roots: roots, Intermediates: inter, CurrentTime: e.clock.Now(),
		KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		e.t.Fatalf("issued certificate does not verify: %v", err)
	}
	if len(certs[0].URIs) != 1 || certs[0].URIs[0].String() != want.String() {
		e.t.Fatalf("issued certificate names %v, want %s", certs[0].URIs, want)
	}
	return certs[:2]
}

func wantCode(t *testing.T, err error, code codes.Code) {
	t.Helper()
	if status.Code(err) != code {
		t.Fatalf("error = %v, want code %s", err, code)
	}
}

func (e *env) metrics() string {
	e.t.Helper()
	resp, err := http.Get("http://" + e.cp.Addrs().Monitoring.String() + "/metrics")
	if err != nil {
		e.t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		e.t.Fatal(err)
	}
	return string(b)
}

func metadataOutgoing(ctx context.Context, kv ...string) context.Context {
	return metadata.NewOutgoingContext(ctx, metadata.Pairs(kv...))
}

func randHex(n int) string {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		panic(err)
	}
	return hex.EncodeToString(b)
}

func openPostgres(t *testing.T, dsn string) *sql.DB {
	t.Helper()
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { db.Close() })
	return db
}

func rootPool(e *env) *x509.CertPool {
	p := x509.NewCertPool()
	for _, r := range e.cp.Authority().Current().Roots {
		p.AddCert(r)
	}
	return p
}
