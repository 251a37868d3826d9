package controlplane_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/federation"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/controlplane"
)

// The bundle stream sends the bundle at once and again on every change,
// to a caller with no client certificate.
func TestWatchBundle(t *testing.T) {
	e := start(t, nil)
	roots := x509.NewCertPool()
	roots.AddCert(e.cp.Authority().Current().Roots[0])
	conn, err := grpc.NewClient(e.cp.Addrs().CA.String(), grpc.WithTransportCredentials(credentials.NewTLS(
		&tls.Config{RootCAs: roots, ServerName: "localhost", Time: e.clock.Now})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := cav1.NewTrustBundleServiceClient(conn).WatchBundle(ctx, &cav1.WatchBundleRequest{})
	if err != nil {
		t.Fatal(err)
	}
	first, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	want := e.cp.Authority().Current().Roots
	if first.TrustDomain != "cluster.local" || len(first.X509Authorities) != len(want) || string(first.X509Authorities[0]) != string(want[0].Raw) {
		t.Fatalf("first bundle = %v; want the CA's roots", first)
	}
	e.cp.Authority().Replace(e.cp.Authority().Current())
	second, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if second.SequenceNumber != first.SequenceNumber+1 {
		t.Fatalf("sequence %d after %d, want the next", second.SequenceNumber, first.SequenceNumber)
	}
}

// The SPIFFE bundle endpoint serves the bundle to a federating peer that
// authenticates it with the https_spiffe profile.
func TestBundleEndpoint(t *testing.T) {
	e := start(t, func(c *controlplane.Config) { c.Listen.Bundle = "127.0.0.1:0" })
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	endpointID := spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh")
	b, err := federation.FetchBundle(context.Background(), td, "https://"+e.cp.Addrs().Bundle.String(),
		federation.WithSPIFFEAuth(e.cp.Authority(), endpointID))
	if err != nil {
		t.Fatal(err)
	}
	if got := b.X509Authorities(); len(got) != 1 || !got[0].Equal(e.cp.Authority().Current().Roots[0]) {
		t.Fatalf("endpoint served %d authorities, want the CA's root", len(got))
	}
}
