package caclient

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/agent/internal/testca"
	"github.com/trustmesh/trustmesh/agent/svid"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td  = spiffeid.RequireTrustDomainFromString("cluster.local")
	own = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
)

type fixture struct {
	auth   *testca.Authority
	server *testca.Server
}

func newFixture(t *testing.T) *fixture {
	t.Helper()
	auth := testca.New(t, td, time.Now())
	srv, err := testca.NewServer(testca.ServerConfig{
		Authority: auth,
		Now:       time.Now,
		Tokens:    map[string]spiffeid.ID{"good-token": own},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(srv.Stop)
	return &fixture{auth: auth, server: srv}
}

func (f *fixture) client(t *testing.T, cfg Config) *Client {
	t.Helper()
	if cfg.Address == "" {
		cfg.Address = f.server.Addr()
	}
	if cfg.Roots == nil {
		cfg.Roots = func() []*x509.Certificate { return []*x509.Certificate{f.auth.Root} }
	}
	c, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func csr(t *testing.T) []byte {
	t.Helper()
	key, err := svid.GenerateKey(svid.ECP256)
	if err != nil {
		t.Fatal(err)
	}
	b, err := svid.NewCSR(key, spiffeid.ID{})
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestIssueWithTokenSendsBearerAndNoCertificate(t *testing.T) {
	f := newFixture(t)
	c := f.client(t, Config{})
	chain, err := c.IssueWithToken(context.Background(), "good-token", csr(t), 10*time.Minute)
	if err != nil {
		t.Fatal(err)
	}
	if len(chain) != 3 || !chain[2].Equal(f.auth.Root) {
		t.Fatalf("chain of %d certificates, want leaf, intermediate, root", len(chain))
	}
	if got := chain[0].NotAfter.Sub(chain[0].NotBefore); got != 10*time.Minute {
		t.Fatalf("asked for 10m, CA saw %s", got)
	}
	calls := f.server.Calls()
	if len(calls) != 1 || calls[0].Token != "good-token" || !calls[0].ClientID.IsZero() {
		t.Fatalf("CA saw %+v, want the bearer token and no client certificate", calls)
	}
}

func TestRenewPresentsCertificateAndNoToken(t *testing.T) {
	f := newFixture(t)
	c := f.client(t, Config{})
	key, err := svid.GenerateKey(svid.ECP256)
	if err != nil {
		t.Fatal(err)
	}
	current, err := f.auth.Issue(key.Public(), own, time.Now().Add(-time.Minute), time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	cert := tls.Certificate{Certificate: [][]byte{current[0].Raw, current[1].Raw}, PrivateKey: key}
	if _, err := c.Renew(context.Background(), cert, csr(t), 0); err != nil {
		t.Fatal(err)
	}
	calls := f.server.Calls()
	if len(calls) != 1 || calls[0].Token != "" || calls[0].ClientID != own || calls[0].Issued != own {
		t.Fatalf("CA saw %+v, want a client certificate for %s and no token", calls, own)
	}
}

func TestErrorsCarryGRPCCodes(t *testing.T) {
	f := newFixture(t)
	stranger := testca.New(t, td, time.Now())
	for _, tc := range []struct {
		name string
		cfg  Config
		tok  string
		want codes.Code
	}{
		{"unknown token", Config{}, "bad-token", codes.Unauthenticated},
		{"CA serving certificate from another root", Config{Roots: func() []*x509.Certificate { return []*x509.Certificate{stranger.Root} }}, "good-token", codes.Unavailable},
		{"CA serving certificate for another name", Config{ServerName: "trustmesh.example.com"}, "good-token", codes.Unavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := f.client(t, tc.cfg)
			_, err := c.IssueWithToken(context.Background(), tc.tok, csr(t), 0)
			if got := status.Code(err); got != tc.want {
				t.Fatalf("code %s (%v), want %s", got, err, tc.want)
			}
		})
	}
	t.Run("CA down", func(t *testing.T) {
		c := f.client(t, Config{})
		f.server.Stop()
		_, err := c.IssueWithToken(context.Background(), "good-token", csr(t), 0)
		if got := status.Code(err); got != codes.Unavailable {
			t.Fatalf("code %s (%v), want Unavailable", got, err)
		}
		if err := f.server.Start(); err != nil {
			t.Fatal(err)
		}
		if _, err := c.IssueWithToken(context.Background(), "good-token", csr(t), 0); err != nil {
			t.Fatalf("after the CA came back: %v", err)
		}
	})
}

func TestWatchBundleFollowsChanges(t *testing.T) {
	f := newFixture(t)
	c := f.client(t, Config{})
	next := testca.New(t, td, time.Now())
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	got := make(chan *cav1.TrustBundle, 10)
	done := make(chan error, 1)
	go func() {
		done <- c.WatchBundle(ctx, func(b *cav1.TrustBundle) error { got <- b; return nil })
	}()
	first := recv(t, got)
	if first.GetTrustDomain() != "cluster.local" || len(first.GetX509Authorities()) != 1 {
		t.Fatalf("first bundle %+v", first)
	}
	f.server.SetBundleAuthorities(f.auth.Root, next.Root)
	second := recv(t, got)
	if len(second.GetX509Authorities()) != 2 || second.GetSequenceNumber() <= first.GetSequenceNumber() {
		t.Fatalf("second bundle has %d roots, sequence %d after %d", len(second.GetX509Authorities()), second.GetSequenceNumber(), first.GetSequenceNumber())
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("WatchBundle returned %v after cancel, want context.Canceled", err)
	}
}

func TestWatchBundleReportsBrokenStream(t *testing.T) {
	f := newFixture(t)
	c := f.client(t, Config{})
	received := make(chan struct{}, 1)
	done := make(chan error, 1)
	go func() {
		done <- c.WatchBundle(context.Background(), func(*cav1.TrustBundle) error { received <- struct{}{}; return nil })
	}()
	<-received
	f.server.Stop()
	select {
	case err := <-done:
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("broken stream gave %v, want Unavailable", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("WatchBundle did not return when the CA went away")
	}
}

func TestParseChain(t *testing.T) {
	f := newFixture(t)
	rootPEM := string(f.auth.RootPEM())
	for _, tc := range []struct {
		name string
		in   []string
		n    int
	}{
		{"one certificate per string", []string{rootPEM, rootPEM}, 2},
		{"several in one string", []string{rootPEM + rootPEM}, 2},
		{"empty", nil, 0},
		{"not PEM", []string{"garbage"}, 0},
		{"a key", []string{"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"}, 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			chain, err := parseChain(tc.in)
			if tc.n == 0 {
				if !errors.Is(err, ErrBadResponse) {
					t.Fatalf("error %v, want ErrBadResponse", err)
				}
				return
			}
			if err != nil || len(chain) != tc.n {
				t.Fatalf("got %d certificates, %v; want %d", len(chain), err, tc.n)
			}
		})
	}
}

func recv(t *testing.T, ch <-chan *cav1.TrustBundle) *cav1.TrustBundle {
	t.Helper()
	select {
	case b := <-ch:
		return b
	case <-time.After(10 * time.Second):
		t.Fatal("no bundle received")
		return nil
	}
}
