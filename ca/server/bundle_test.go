package server_test

import (
	"context"
	"crypto/x509"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/server"
)

// rotate puts a new root and intermediate in force, keeping the old roots
// trusted, and returns the new material.
func rotate(t *testing.T, f *fixture) *authority.Material {
	t.Helper()
	next, err := authority.Generate(context.Background(), td, f.clock.Now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	next.Roots = append(append([]*x509.Certificate(nil), f.auth.Current().Roots...), next.Roots...)
	f.auth.Replace(next)
	return next
}

func sameCerts(t *testing.T, got [][]byte, want []*x509.Certificate) bool {
	t.Helper()
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if string(got[i]) != string(want[i].Raw) {
			return false
		}
	}
	return true
}

// TestWatchBundle: a watcher gets the roots in force at once, every change
// with a higher sequence number, and Unavailable when the CA shuts down.
func TestWatchBundle(t *testing.T) {
	f := newFixture(t)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := cav1.NewTrustBundleServiceClient(f.conn(t, nil)).WatchBundle(ctx, &cav1.WatchBundleRequest{})
	if err != nil {
		t.Fatal(err)
	}
	b, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if b.GetTrustDomain() != td.Name() || !sameCerts(t, b.GetX509Authorities(), f.auth.Current().Roots) {
		t.Fatalf("first bundle for %q has %d roots; want the %d in force", b.GetTrustDomain(), len(b.GetX509Authorities()), len(f.auth.Current().Roots))
	}
	if b.GetRefreshHintSeconds() != int64(server.DefaultRefreshHint/time.Second) {
		t.Errorf("refresh hint %ds", b.GetRefreshHintSeconds())
	}
	seq := b.GetSequenceNumber()

	next := rotate(t, f)
	b, err = stream.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if !sameCerts(t, b.GetX509Authorities(), next.Roots) || len(next.Roots) != 2 {
		t.Fatalf("after a rotation the watcher has %d roots; want old and new", len(b.GetX509Authorities()))
	}
	if b.GetSequenceNumber() <= seq {
		t.Errorf("sequence number %d did not grow past %d", b.GetSequenceNumber(), seq)
	}

	close(f.done)
	if _, err := stream.Recv(); status.Code(err) != codes.Unavailable {
		t.Fatalf("on shutdown the stream ended with %v; want Unavailable", err)
	}
}

// TestFederationHandler: the bundle endpoint serves the roots in force, and
// follows rotation.
func TestFederationHandler(t *testing.T) {
	f := newFixture(t)
	h, err := server.FederationHandler(td, f.auth)
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(h)
	defer srv.Close()
	fetch := func() []*x509.Certificate {
		t.Helper()
		resp, err := http.Get(srv.URL)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("status %d", resp.StatusCode)
		}
		b, err := spiffebundle.Read(td, resp.Body)
		if err != nil {
			t.Fatal(err)
		}
		return b.X509Authorities()
	}
	if got := fetch(); !sameRoots(got, f.auth.Current().Roots) {
		t.Fatalf("endpoint serves %d roots, not the ones in force", len(got))
	}
	next := rotate(t, f)
	if got := fetch(); !sameRoots(got, next.Roots) {
		t.Fatalf("after rotation the endpoint serves %d roots, not the %d in force", len(got), len(next.Roots))
	}
}

func sameRoots(got, want []*x509.Certificate) bool {
	if len(got) != len(want) {
		return false
	}
	for i := range got {
		if !got[i].Equal(want[i]) {
			return false
		}
	}
	return true
}

// TestExpiryMetric: each CA certificate in force is exported with its
// expiry, read at scrape time so that it follows rotation.
func TestExpiryMetric(t *testing.T) {
	f := newFixture(t)
	const name = "trustmesh_ca_certificate_expiry_timestamp_seconds"
	check := func(role string, c *x509.Certificate, present bool) {
		t.Helper()
		v, ok := metricValue(t, f.reg, name, map[string]string{"role": role, "serial": c.SerialNumber.Text(16)})
		if ok != present || present && v != float64(c.NotAfter.Unix()) {
			t.Errorf("%s %s: exported=%v value=%v; want exported=%v value=%d", role, ca.SerialHex(c), ok, v, present, c.NotAfter.Unix())
		}
	}
	old := f.auth.Current()
	check("intermediate", old.Cert, true)
	check("root", old.Roots[0], true)

	next := rotate(t, f)
	check("intermediate", old.Cert, false)
	check("intermediate", next.Cert, true)
	check("root", old.Roots[0], true)
	check("root", next.Roots[1], true)
}
