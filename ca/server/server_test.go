package server_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"log/slog"
	"math/big"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"
	clocktesting "k8s.io/utils/clock/testing"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/server"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

// quiet drops the servers' logs; tests assert on what is returned,
// journalled and counted.
var quiet = slog.New(slog.DiscardHandler)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	alice = spiffeid.RequireFromPath(td, "/ns/default/sa/alice")
	bob   = spiffeid.RequireFromPath(td, "/ns/default/sa/bob")
	cpID  = spiffeid.RequireFromPath(td, "/ns/trustmesh-system/sa/trustmesh")
)

// fixture is a CA as the control plane assembles it: real key material, a
// signed SQLite journal, the real authenticators and the refusal log, served
// over TLS on loopback with the CA's own serving certificate.
type fixture struct {
	clock    *clocktesting.FakeClock
	auth     *authority.Authority
	store    *journal.Store
	ca       *ca.CA
	tokens   *authn.JoinTokens
	refusals *journal.RefusalLog
	reg      *prometheus.Registry
	serving  *server.ServingCert
	addr     string
	done     chan struct{}
	// spans records what the certificate service traces: the fixture
	// serves with tracing on.
	spans *tracetest.SpanRecorder
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	ctx := context.Background()
	// TLS peers verify against the real time, so the CA's clock starts at
	// it; tests step it forward from there.
	now := time.Now().Truncate(time.Second)
	m, err := authority.Generate(ctx, td, now, 0)
	if err != nil {
		t.Fatal(err)
	}
	f := &fixture{clock: clocktesting.NewFakeClock(now), auth: authority.New(td, m), reg: prometheus.NewRegistry(), done: make(chan struct{}),
		spans: tracetest.NewSpanRecorder()}
	f.store = openJournal(t)
	if f.ca, err = ca.New(ca.Config{TrustDomain: td, Authority: f.auth, Recorder: f.store, Clock: f.clock, Reserved: []spiffeid.ID{cpID}}); err != nil {
		t.Fatal(err)
	}
	f.tokens = &authn.JoinTokens{TrustDomain: td, Store: f.store, Clock: f.clock}
	authenticator := &authn.Authenticator{
		TrustDomain: td,
		JoinTokens:  f.tokens,
		Renewal:     &authn.Renewal{TrustDomain: td, Bundle: f.auth, Store: f.store, MaxEnrolmentAge: time.Hour, Clock: f.clock},
	}
	f.refusals = journal.NewRefusalLog(journal.RefusalLogConfig{Appender: f.store, Clock: f.clock})
	metrics := server.NewMetrics(f.reg, f.auth.Current)
	if f.serving, err = server.NewServingCert(ctx, server.ServingCertConfig{
		Issuer: f.ca, ID: cpID, IPs: []net.IP{net.IPv4(127, 0, 0, 1)}, Clock: f.clock, Log: quiet,
		Issuing: func() *x509.Certificate { return f.auth.Current().Cert },
	}); err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer(grpc.Creds(credentials.NewTLS(f.serving.TLSConfig())))
	pb.RegisterIstioCertificateServiceServer(srv, server.NewCertificateService(server.CertificateServiceConfig{
		Issuer: f.ca, Authenticator: authenticator, Refusals: f.refusals, Metrics: metrics, Clock: f.clock, Log: quiet,
		TracerProvider: sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(f.spans)),
	}))
	cav1.RegisterTrustBundleServiceServer(srv, &server.BundleService{Bundles: f.auth, Done: f.done})
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f.addr = lis.Addr().String()
	served := make(chan struct{})
	go func() { defer close(served); _ = srv.Serve(lis) }()
	t.Cleanup(func() {
		select {
		case <-f.done:
		default:
			close(f.done)
		}
		srv.Stop()
		<-served
	})
	return f
}

func openJournal(t *testing.T) *journal.Store {
	t.Helper()
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, _, err := journal.NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	store, err := journal.Open(context.Background(), journal.Config{DSN: filepath.Join(t.TempDir(), "journal.db"), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	return store
}

// conn dials the CA as an agent does: it verifies that the server is the
// control plane, and presents client when it is set.
func (f *fixture) conn(t *testing.T, client *x509svid.SVID) *grpc.ClientConn {
	t.Helper()
	var tlsCfg *tls.Config
	if client != nil {
		tlsCfg = tlsconfig.MTLSClientConfig(client, f.auth, tlsconfig.AuthorizeID(cpID))
	} else {
		tlsCfg = tlsconfig.TLSClientConfig(f.auth, tlsconfig.AuthorizeID(cpID))
	}
	cc, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cc.Close() })
	return cc
}

// selfSignedSVID is a certificate for id that no trustmesh root signed.
func selfSignedSVID(t *testing.T, id spiffeid.ID) *x509svid.SVID {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(7), URIs: []*url.URL{id.URL()},
		NotBefore: time.Now().Add(-time.Minute), NotAfter: time.Now().Add(time.Hour),
		KeyUsage:    x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, key.Public(), key)
	if err != nil {
		t.Fatal(err)
	}
	cert, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: []*x509.Certificate{cert}, PrivateKey: key}
}

func newKey(t *testing.T) crypto.Signer {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func makeCSR(t *testing.T, key crypto.Signer, uris ...spiffeid.ID) string {
	t.Helper()
	tmpl := &x509.CertificateRequest{Subject: pkix.Name{Organization: []string{"test"}}}
	for _, u := range uris {
		tmpl.URIs = append(tmpl.URIs, u.URL())
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

func (f *fixture) joinToken(t *testing.T, id spiffeid.ID) string {
	t.Helper()
	tok, _, err := f.tokens.Create(context.Background(), id, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

func bearer(tok string) context.Context {
	return metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+tok)
}

func parseChain(t *testing.T, pems []string) []*x509.Certificate {
	t.Helper()
	var out []*x509.Certificate
	for _, p := range pems {
		block, rest := pem.Decode([]byte(p))
		if block == nil || len(strings.TrimSpace(string(rest))) != 0 {
			t.Fatalf("chain element is not exactly one PEM block: %q", p)
		}
		c, err := x509.ParseCertificate(block.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		out = append(out, c)
	}
	return out
}

// journalRows flushes pending refusals and returns the journal's history.
func (f *fixture) journalRows(t *testing.T) []audit.Row {
	t.Helper()
	ctx := context.Background()
	if err := f.refusals.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	rows, err := audit.Log(ctx, f.store, audit.Filter{})
	if err != nil {
		t.Fatal(err)
	}
	return rows
}

// metricValue is the value of the counter, gauge or histogram count named
// name whose labels include every one in want; ok is false when none has.
func metricValue(t *testing.T, reg prometheus.Gatherer, name string, want map[string]string) (float64, bool) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
	metrics:
		for _, m := range mf.GetMetric() {
			got := map[string]string{}
			for _, l := range m.GetLabel() {
				got[l.GetName()] = l.GetValue()
			}
			for k, v := range want {
				if got[k] != v {
					continue metrics
				}
			}
			switch mf.GetType() {
			case dto.MetricType_COUNTER:
				return m.GetCounter().GetValue(), true
			case dto.MetricType_GAUGE:
				return m.GetGauge().GetValue(), true
			case dto.MetricType_HISTOGRAM:
				return float64(m.GetHistogram().GetSampleCount()), true
			}
		}
	}
	return 0, false
}
