package testca

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"net"
	"path/filepath"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
)

// New is NewAuthority for a test: it fails t instead of returning an error.
func New(t testing.TB, td spiffeid.TrustDomain, now time.Time) *Authority {
	t.Helper()
	a, err := NewAuthority(td, now)
	if err != nil {
		t.Fatal(err)
	}
	return a
}

// SVID issues id a workload SVID on a fresh P-256 key, valid from notBefore
// for ttl, shaped as the agent holds it: leaf and intermediate, without the
// root.
func (a *Authority) SVID(t testing.TB, id spiffeid.ID, notBefore time.Time, ttl time.Duration) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Issue(key.Public(), id, notBefore, ttl)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: id, Certificates: chain[:2], PrivateKey: key}
}

// ServeUnix serves g on a unix socket in a fresh temporary directory until
// the test ends, and returns the socket's path.
func ServeUnix(t testing.TB, g *grpc.Server) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "agent.sock")
	lis, err := net.Listen("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = g.Serve(lis)
	}()
	t.Cleanup(func() {
		g.Stop()
		<-done
	})
	return path
}
