package caclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/peer"

	"github.com/trustmesh/trustmesh/agent/internal/testca"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

// nodeService records who called: the client certificate's serial or the
// bearer token. It answers one result too few when short is set.
type nodeService struct {
	cav1.UnimplementedNodeServiceServer
	mu      sync.Mutex
	callers []string
	short   bool
}

func (n *nodeService) caller(ctx context.Context) {
	who := "anonymous"
	if md, ok := metadata.FromIncomingContext(ctx); ok && len(md.Get("authorization")) > 0 {
		who = md.Get("authorization")[0]
	} else if p, ok := peer.FromContext(ctx); ok {
		if ti, ok := p.AuthInfo.(credentials.TLSInfo); ok && len(ti.State.PeerCertificates) > 0 {
			who = "serial " + ti.State.PeerCertificates[0].SerialNumber.String()
		}
	}
	n.mu.Lock()
	n.callers = append(n.callers, who)
	n.mu.Unlock()
}

func (n *nodeService) FetchEntries(ctx context.Context, _ *cav1.FetchEntriesRequest) (*cav1.FetchEntriesResponse, error) {
	n.caller(ctx)
	return &cav1.FetchEntriesResponse{Node: "node-a", Revision: "1"}, nil
}

func (n *nodeService) BatchNewX509SVID(ctx context.Context, req *cav1.BatchNewX509SVIDRequest) (*cav1.BatchNewX509SVIDResponse, error) {
	n.caller(ctx)
	resp := &cav1.BatchNewX509SVIDResponse{}
	for range req.GetParams() {
		resp.Results = append(resp.Results, &cav1.NewX509SVIDResult{Code: 7, Reason: cav1.NotOnNode})
	}
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.short && len(resp.Results) > 0 {
		resp.Results = resp.Results[1:]
	}
	return resp, nil
}

func (n *nodeService) last() string {
	n.mu.Lock()
	defer n.mu.Unlock()
	return n.callers[len(n.callers)-1]
}

func nodeFixture(t *testing.T) (*testca.Authority, *testca.Server, *nodeService) {
	t.Helper()
	auth := testca.New(t, td, time.Now())
	svc := &nodeService{}
	srv, err := testca.NewServer(testca.ServerConfig{
		Authority: auth, Now: time.Now,
		Register: func(g *grpc.Server) { cav1.RegisterNodeServiceServer(g, svc) },
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return auth, srv, svc
}

func tlsCert(s *x509svid.SVID) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
	for _, x := range s.Certificates {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// A renewed node SVID is presented from the next call on: the client
// reconnects when the certificate changes, and keeps the connection when
// it does not.
func TestNodeClientPresentsTheCurrentCertificate(t *testing.T) {
	auth, srv, svc := nodeFixture(t)
	nodeID := spiffeid.RequireFromString("spiffe://cluster.local/node/node-a")
	var (
		mu  sync.Mutex
		cur = auth.SVID(t, nodeID, time.Now(), time.Hour)
	)
	c, err := NewNodeClient(NodeConfig{
		Address: srv.Addr(),
		Roots:   func() []*x509.Certificate { return []*x509.Certificate{auth.Root} },
		Certificate: func() *tls.Certificate {
			mu.Lock()
			defer mu.Unlock()
			return tlsCert(cur)
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx := context.Background()
	first := "serial " + cur.Certificates[0].SerialNumber.String()
	for range 2 {
		if _, err := c.FetchEntries(ctx); err != nil {
			t.Fatal(err)
		}
		if got := svc.last(); got != first {
			t.Fatalf("caller %q, want %q", got, first)
		}
	}
	mu.Lock()
	cur = auth.SVID(t, nodeID, time.Now(), time.Hour)
	mu.Unlock()
	if _, err := c.BatchNewX509SVID(ctx, []*cav1.NewX509SVIDParams{{SpiffeId: "spiffe://cluster.local/ns/a/sa/b"}}); err != nil {
		t.Fatal(err)
	}
	if got, want := svc.last(), "serial "+cur.Certificates[0].SerialNumber.String(); got != want {
		t.Fatalf("after renewal the caller is %q, want %q", got, want)
	}
}

func TestNodeClientSendsTheTokenOfTheMoment(t *testing.T) {
	auth, srv, svc := nodeFixture(t)
	tok := "one"
	c, err := NewNodeClient(NodeConfig{
		Address: srv.Addr(),
		Roots:   func() []*x509.Certificate { return []*x509.Certificate{auth.Root} },
		Token:   func() (string, error) { return tok, nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	for _, tok = range []string{"one", "two"} {
		if _, err := c.FetchEntries(context.Background()); err != nil {
			t.Fatal(err)
		}
		if got := svc.last(); got != "Bearer "+tok {
			t.Errorf("authorization %q, want Bearer %s", got, tok)
		}
	}
}

func TestNodeClientRefuses(t *testing.T) {
	auth, srv, svc := nodeFixture(t)
	other := testca.New(t, td, time.Now())
	var rootsMu sync.Mutex
	roots := []*x509.Certificate{other.Root}
	getRoots := func() []*x509.Certificate {
		rootsMu.Lock()
		defer rootsMu.Unlock()
		return roots
	}
	c, err := NewNodeClient(NodeConfig{
		Address: srv.Addr(),
		Roots:   getRoots,
		Token:   func() (string, error) { return "t", nil },
	})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	defer cancel()
	if _, err := c.FetchEntries(ctx); err == nil {
		t.Fatal("a CA whose certificate does not chain to the roots was trusted")
	}
	// The bundle now has the CA's root: a new handshake verifies with it.
	// (after gRPC's reconnection backoff).
	rootsMu.Lock()
	roots = []*x509.Certificate{auth.Root}
	rootsMu.Unlock()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		_, err := c.FetchEntries(ctx)
		if err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after the bundle changed: %v", err)
		}
	}
	if _, err := c.BatchNewX509SVID(ctx, make([]*cav1.NewX509SVIDParams, cav1.MaxBatch+1)); err == nil ||
		!strings.Contains(err.Error(), "at most 500") {
		t.Errorf("an oversized batch: %v", err)
	}
	svc.mu.Lock()
	svc.short = true
	svc.mu.Unlock()
	if _, err := c.BatchNewX509SVID(ctx, []*cav1.NewX509SVIDParams{{}, {}}); !errors.Is(err, ErrBadResponse) {
		t.Errorf("one result too few: %v, want ErrBadResponse", err)
	}
	if _, err := NewNodeClient(NodeConfig{Address: srv.Addr(), Roots: getRoots}); err == nil {
		t.Error("a client with neither a certificate nor a token")
	}
	c2, err := NewNodeClient(NodeConfig{Address: srv.Addr(), Roots: getRoots,
		Certificate: func() *tls.Certificate { return nil }})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c2.FetchEntries(ctx); !errors.Is(err, ErrNoNodeCredential) {
		t.Errorf("without a certificate yet: %v, want ErrNoNodeCredential", err)
	}
}
