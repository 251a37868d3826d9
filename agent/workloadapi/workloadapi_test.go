package workloadapi

import (
	"context"
	"crypto"
	"os"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/proto/spiffe/workload"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td  = spiffeid.RequireTrustDomainFromString("cluster.local")
	own = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
)

type fixture struct {
	auth  *testca.Authority
	store *identity.Store
	addr  string
}

// newFixture serves the Workload API from a fresh store on a unix socket.
func newFixture(t *testing.T) *fixture {
	t.Helper()
	auth := testca.New(t, td, time.Now())
	f := &fixture{auth: auth, store: identity.New()}
	srv, err := New(Config{Source: f.store})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.Register(g)
	path := testca.ServeUnix(t, g)
	f.addr = "unix://" + path
	return f
}

func (f *fixture) issue(t *testing.T) *x509svid.SVID {
	t.Helper()
	return f.auth.SVID(t, own, time.Now().Add(-time.Minute), time.Hour)
}

func (f *fixture) client(t *testing.T) *workloadapi.Client {
	t.Helper()
	c, err := workloadapi.New(context.Background(), workloadapi.WithAddr(f.addr))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

type watcher struct {
	updates chan *workloadapi.X509Context
}

func (w watcher) OnX509ContextUpdate(c *workloadapi.X509Context) { w.updates <- c }
func (w watcher) OnX509ContextWatchError(error)                  {}

func TestGoSPIFFEClientFetchesVerifiesAndFollowsRotation(t *testing.T) {
	f := newFixture(t)
	first := f.issue(t)
	f.store.SetBundle(f.auth.Bundle())
	f.store.SetSVID(first)
	c := f.client(t)

	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	x509ctx, err := c.FetchX509Context(ctx)
	if err != nil {
		t.Fatal(err)
	}
	got := x509ctx.DefaultSVID()
	id, _, err := x509svid.Verify(got.Certificates, x509ctx.Bundles)
	if err != nil {
		t.Fatalf("fetched SVID does not verify against the fetched bundle: %v", err)
	}
	if id != own || got.ID != own {
		t.Fatalf("fetched SVID for %s, want %s", id, own)
	}
	if !got.Certificates[0].Equal(first.Certificates[0]) {
		t.Fatal("fetched another certificate than the agent holds")
	}
	if !got.PrivateKey.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(got.Certificates[0].PublicKey) {
		t.Fatal("fetched key does not match the fetched certificate")
	}

	w := watcher{updates: make(chan *workloadapi.X509Context, 10)}
	watchCtx, stopWatch := context.WithCancel(context.Background())
	watchDone := make(chan error, 1)
	go func() { watchDone <- c.WatchX509Context(watchCtx, w) }()
	if u := next(t, w.updates); !u.DefaultSVID().Certificates[0].Equal(first.Certificates[0]) {
		t.Fatal("watch did not start with the current SVID")
	}
	second := f.issue(t)
	f.store.SetSVID(second)
	u := next(t, w.updates)
	if !u.DefaultSVID().Certificates[0].Equal(second.Certificates[0]) {
		t.Fatal("rotation not streamed to the watcher")
	}
	if _, _, err := x509svid.Verify(u.DefaultSVID().Certificates, u.Bundles); err != nil {
		t.Fatalf("rotated SVID does not verify: %v", err)
	}
	stopWatch()
	<-watchDone
}

func TestBundlesStreamed(t *testing.T) {
	f := newFixture(t)
	f.store.SetBundle(f.auth.Bundle())
	c := f.client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	set, err := c.FetchX509Bundles(ctx)
	if err != nil {
		t.Fatal(err)
	}
	b, ok := set.Get(td)
	if !ok || !b.Equal(f.auth.Bundle()) {
		t.Fatalf("fetched bundles %v, want the cluster.local bundle", set.Bundles())
	}
}

func TestStreamWaitsForFirstSVID(t *testing.T) {
	f := newFixture(t)
	f.store.SetBundle(f.auth.Bundle())
	c := f.client(t)
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	if _, err := c.FetchX509SVID(ctx); status.Code(err) != codes.DeadlineExceeded {
		t.Fatalf("fetch without an SVID: %v, want DeadlineExceeded", err)
	}
	result := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		_, err := c.FetchX509SVID(ctx)
		result <- err
	}()
	f.store.SetSVID(f.issue(t))
	if err := <-result; err != nil {
		t.Fatalf("waiting fetch did not get the first SVID: %v", err)
	}
}

func TestSecurityHeaderRequired(t *testing.T) {
	f := newFixture(t)
	f.store.SetBundle(f.auth.Bundle())
	f.store.SetSVID(f.issue(t))
	conn, err := grpc.NewClient(f.addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	wl := workload.NewSpiffeWorkloadAPIClient(conn)
	calls := []struct {
		name string
		call func(context.Context) error
		// withHeader is the code once the header is sent.
		withHeader codes.Code
	}{
		{"FetchX509SVID", func(ctx context.Context) error {
			s, err := wl.FetchX509SVID(ctx, &workload.X509SVIDRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		}, codes.OK},
		{"FetchX509Bundles", func(ctx context.Context) error {
			s, err := wl.FetchX509Bundles(ctx, &workload.X509BundlesRequest{})
			if err != nil {
				return err
			}
			_, err = s.Recv()
			return err
		}, codes.OK},
		{"FetchJWTSVID", func(ctx context.Context) error {
			_, err := wl.FetchJWTSVID(ctx, &workload.JWTSVIDRequest{Audience: []string{"x"}})
			return err
		}, codes.Unimplemented},
	}
	for _, tc := range calls {
		t.Run(tc.name, func(t *testing.T) {
			for _, hc := range []struct {
				name string
				md   metadata.MD
				want codes.Code
			}{
				{"no header", nil, codes.InvalidArgument},
				{"header false", metadata.Pairs("workload.spiffe.io", "false"), codes.InvalidArgument},
				{"header twice", metadata.Pairs("workload.spiffe.io", "true", "workload.spiffe.io", "true"), codes.InvalidArgument},
				{"header true", metadata.Pairs("workload.spiffe.io", "true"), tc.withHeader},
			} {
				ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
				if hc.md != nil {
					ctx = metadata.NewOutgoingContext(ctx, hc.md)
				}
				err := tc.call(ctx)
				cancel()
				if got := status.Code(err); got != hc.want {
					t.Errorf("%s: code %s (%v), want %s", hc.name, got, err, hc.want)
				}
			}
		})
	}
}

func next(t *testing.T, ch <-chan *workloadapi.X509Context) *workloadapi.X509Context {
	t.Helper()
	select {
	case u := <-ch:
		return u
	case <-time.After(10 * time.Second):
		t.Fatal("no update")
		return nil
	}
}

// stores is a caller's view over several identity stores, as the node agent
// gives one.
type stores []*identity.Store

func (ss stores) View(ctx context.Context) (identity.View, <-chan struct{}, error) {
	var svids []*x509svid.SVID
	changed := make(chan struct{})
	var chans []<-chan struct{}
	var b identity.Snapshot
	for _, s := range ss {
		snap, ch := s.Load()
		svids = append(svids, snap.SVID)
		if b.Bundle == nil {
			b = snap
		}
		chans = append(chans, ch)
	}
	go func() {
		defer close(changed)
		select {
		case <-ctx.Done():
		case <-chans[0]:
		case <-chans[1]:
		}
	}()
	return identity.NewView(svids, b.Bundle), changed, nil
}

func TestResolvedCallerGetsAllItsSVIDsSortedAndTheirRotations(t *testing.T) {
	auth := testca.New(t, td, time.Now())
	other := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/api")
	ss := stores{identity.New(), identity.New()}
	for i, id := range []spiffeid.ID{own, other} { // cart before api: the view sorts
		ss[i].SetBundle(auth.Bundle())
		ss[i].SetSVID(auth.SVID(t, id, time.Now().Add(-time.Minute), time.Hour))
	}
	srv, err := New(Config{Resolve: func(context.Context) (identity.Viewer, error) { return ss, nil }})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.Register(g)
	c, err := workloadapi.New(context.Background(), workloadapi.WithAddr("unix://"+testca.ServeUnix(t, g)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	w := watcher{updates: make(chan *workloadapi.X509Context, 10)}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- c.WatchX509Context(ctx, w) }()
	defer func() { cancel(); <-done }()
	u := next(t, w.updates)
	if len(u.SVIDs) != 2 || u.SVIDs[0].ID != other || u.SVIDs[1].ID != own {
		t.Fatalf("got SVIDs %v, want [%s %s]", ids(u), other, own)
	}
	for _, s := range u.SVIDs {
		if _, _, err := x509svid.Verify(s.Certificates, u.Bundles); err != nil {
			t.Fatalf("%s does not verify: %v", s.ID, err)
		}
	}
	rotated := auth.SVID(t, own, time.Now().Add(-time.Minute), time.Hour)
	ss[0].SetSVID(rotated)
	u = next(t, w.updates)
	if len(u.SVIDs) != 2 || !u.SVIDs[1].Certificates[0].Equal(rotated.Certificates[0]) {
		t.Fatalf("rotation of %s not streamed: %v", own, ids(u))
	}
}

func TestResolveRefusalIsTheAnswer(t *testing.T) {
	srv, err := New(Config{Resolve: func(context.Context) (identity.Viewer, error) {
		return nil, status.Error(codes.PermissionDenied, "no identity for this caller")
	}})
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer()
	srv.Register(g)
	c, err := workloadapi.New(context.Background(), workloadapi.WithAddr("unix://"+testca.ServeUnix(t, g)))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.FetchX509SVID(ctx); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchX509SVID: %v, want PermissionDenied", err)
	}
	if _, err := c.FetchX509Bundles(ctx); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchX509Bundles: %v, want PermissionDenied", err)
	}
	if _, err := c.FetchJWTSVID(ctx, jwtsvidParams); status.Code(err) != codes.PermissionDenied {
		t.Fatalf("FetchJWTSVID: %v, want PermissionDenied", err)
	}
}

func TestConfigNeedsOneSource(t *testing.T) {
	if _, err := New(Config{}); err == nil {
		t.Fatal("no Source nor Resolve accepted")
	}
	if _, err := New(Config{Source: identity.New(), Resolve: func(context.Context) (identity.Viewer, error) { return nil, nil }}); err == nil {
		t.Fatal("both Source and Resolve accepted")
	}
}

var jwtsvidParams = jwtsvid.Params{Audience: "x"}

func ids(u *workloadapi.X509Context) []string {
	var out []string
	for _, s := range u.SVIDs {
		out = append(out, s.ID.String())
	}
	return out
}
