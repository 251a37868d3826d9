package server_test

import (
	"context"
	"crypto/x509"
	"errors"
	"net"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/server"
)

// failingIssuer issues through the CA until fail is set.
type failingIssuer struct {
	ca   *ca.CA
	fail atomic.Bool
}

var errIssuerDown = errors.New("issuer down")

func (i *failingIssuer) IssueServing(ctx context.Context, req ca.ServingRequest) (*ca.Issued, error) {
	if i.fail.Load() {
		return nil, errIssuerDown
	}
	return i.ca.IssueServing(ctx, req)
}

func serial(t *testing.T, s *server.ServingCert) string {
	t.Helper()
	c, err := s.Certificate(context.Background())
	if err != nil {
		t.Fatalf("Certificate: %v", err)
	}
	return ca.SerialHex(c.Leaf)
}

// TestServingCertIdentity: the serving certificate names the control plane,
// and its addresses, chains to the bundle, and is what a client that pins
// the control plane's identity accepts.
func TestServingCertIdentity(t *testing.T) {
	f := newFixture(t)
	c, err := f.serving.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	chain := make([]*x509.Certificate, 0, len(c.Certificate))
	for _, der := range c.Certificate {
		cert, err := x509.ParseCertificate(der)
		if err != nil {
			t.Fatal(err)
		}
		chain = append(chain, cert)
	}
	id, _, err := x509svid.Verify(chain, f.auth, x509svid.WithTime(f.clock.Now()))
	if err != nil || id != cpID {
		t.Fatalf("serving chain verifies as %v, %v; want %s", id, err, cpID)
	}
	if len(c.Leaf.IPAddresses) != 1 || !c.Leaf.IPAddresses[0].Equal(net.IPv4(127, 0, 0, 1)) {
		t.Errorf("IP SANs %v, want [127.0.0.1]", c.Leaf.IPAddresses)
	}
	if got := c.Leaf.NotAfter.Sub(f.clock.Now()); got != 24*time.Hour {
		t.Errorf("serving certificate lives %s past now, want the default 24h", got)
	}
	// A client pinning the control plane's ID completes a call; the
	// reserved identity's refusal shows the CA will not give it away.
	_, err = pb.NewIstioCertificateServiceClient(f.conn(t, nil)).
		CreateCertificate(bearer(f.joinToken(t, cpID)), &pb.IstioCertificateRequest{Csr: makeCSR(t, newKey(t))})
	if status.Code(err) != codes.PermissionDenied {
		t.Errorf("a workload asking for the control plane's identity got %v, want PermissionDenied", err)
	}
}

// TestServingCertRenews: the certificate is kept until half its life, then
// renewed; it is renewed at once when the issuing CA rotates; a failed
// renewal keeps the current one while it is valid, and fails after.
func TestServingCertRenews(t *testing.T) {
	f := newFixture(t)
	issuer := &failingIssuer{ca: f.ca}
	s, err := server.NewServingCert(context.Background(), server.ServingCertConfig{
		Issuer: issuer, ID: cpID, DNSNames: []string{"trustmesh.example"}, TTL: time.Hour, Clock: f.clock,
		Issuing: func() *x509.Certificate { return f.auth.Current().Cert },
	})
	if err != nil {
		t.Fatal(err)
	}
	first := serial(t, s)
	c, _ := s.Certificate(context.Background())
	half := c.Leaf.NotBefore.Add(c.Leaf.NotAfter.Sub(c.Leaf.NotBefore) / 2)

	f.clock.SetTime(half.Add(-time.Second))
	if got := serial(t, s); got != first {
		t.Fatalf("renewed before half-life (at %s)", f.clock.Now())
	}
	f.clock.SetTime(half)
	second := serial(t, s)
	if second == first {
		t.Fatal("not renewed at half-life")
	}
	if got := serial(t, s); got != second {
		t.Fatal("renewed again right after renewing")
	}

	// The issuing CA rotates: a new intermediate under a new root, both
	// roots trusted. The next handshake gets a certificate from it.
	next, err := authority.Generate(context.Background(), td, f.clock.Now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	next.Roots = append(f.auth.Current().Roots, next.Roots...)
	f.auth.Replace(next)
	c, err = s.Certificate(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if ca.SerialHex(c.Leaf) == second || c.Leaf.CheckSignatureFrom(next.Cert) != nil {
		t.Fatal("after the CA rotated, the serving certificate is still from the old intermediate")
	}
	third := ca.SerialHex(c.Leaf)
	notAfter := c.Leaf.NotAfter

	// The CA goes away: past half-life the current one is kept while valid.
	issuer.fail.Store(true)
	f.clock.SetTime(notAfter.Add(-time.Second))
	if got := serial(t, s); got != third {
		t.Fatalf("with the issuer down, got %s; want the current %s kept", got, third)
	}
	f.clock.SetTime(notAfter)
	if _, err := s.Certificate(context.Background()); !errors.Is(err, errIssuerDown) {
		t.Fatalf("with the issuer down and the certificate expired, got %v; want the issuer's error", err)
	}
	// It comes back.
	issuer.fail.Store(false)
	if got := serial(t, s); got == third {
		t.Fatal("not renewed once the issuer came back")
	}
}
