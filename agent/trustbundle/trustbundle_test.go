package trustbundle

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"errors"
	"os"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	start = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
)

// streams is a Watcher whose every WatchBundle call takes the next script:
// bundles to deliver, then the stream breaks (or blocks until canceled if
// the script says so).
type streams struct {
	scripts chan script
	opened  chan struct{}
}

type script struct {
	bundles []*cav1.TrustBundle
	hold    bool
}

func (s *streams) WatchBundle(ctx context.Context, fn func(*cav1.TrustBundle) error) error {
	s.opened <- struct{}{}
	var sc script
	select {
	case sc = <-s.scripts:
	case <-ctx.Done():
		return ctx.Err()
	}
	for _, b := range sc.bundles {
		if err := fn(b); err != nil {
			return err
		}
	}
	if sc.hold {
		<-ctx.Done()
		return ctx.Err()
	}
	return status.Error(codes.Unavailable, "stream broken")
}

func msg(seq uint64, domain string, roots ...[]byte) *cav1.TrustBundle {
	return &cav1.TrustBundle{TrustDomain: domain, X509Authorities: roots, SequenceNumber: seq}
}

type harness struct {
	t        *testing.T
	clock    *clocktesting.FakeClock
	streams  *streams
	store    *identity.Store
	follower *Follower
}

func newHarness(t *testing.T) *harness {
	t.Helper()
	h := &harness{
		t:       t,
		clock:   clocktesting.NewFakeClock(start),
		streams: &streams{scripts: make(chan script, 10), opened: make(chan struct{}, 10)},
		store:   identity.New(),
	}
	var err error
	h.follower, err = New(Config{CA: h.streams, Store: h.store, Clock: h.clock})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.follower.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v, want context.Canceled", err)
		}
	})
	return h
}

func (h *harness) waitOpened() {
	h.t.Helper()
	select {
	case <-h.streams.opened:
	case <-time.After(10 * time.Second):
		h.t.Fatal("stream not opened")
	}
}

// waitBackoff waits until the follower sleeps on the clock, then wakes it.
func (h *harness) waitBackoff() {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !h.clock.HasWaiters() {
		if time.Now().After(deadline) {
			h.t.Fatal("follower did not back off")
		}
		time.Sleep(time.Millisecond)
	}
	h.clock.Step(time.Minute)
}

func (h *harness) waitVersion(v uint64) identity.Snapshot {
	h.t.Helper()
	for {
		snap, changed := h.store.Load()
		if snap.Version >= v {
			return snap
		}
		select {
		case <-changed:
		case <-time.After(10 * time.Second):
			h.t.Fatalf("store never reached version %d", v)
		}
	}
}

func TestFollowsStreamAndReconnects(t *testing.T) {
	a, _ := testca.NewAuthority(td, start)
	b, _ := testca.NewAuthority(td, start)
	h := newHarness(t)

	h.waitOpened()
	if h.follower.Synced() {
		t.Fatal("synced before any bundle")
	}
	h.streams.scripts <- script{bundles: []*cav1.TrustBundle{msg(1, "cluster.local", a.Root.Raw), msg(2, "cluster.local", a.Root.Raw)}}
	snap := h.waitVersion(1)
	if !snap.Bundle.Equal(a.Bundle()) {
		t.Fatal("first bundle not applied")
	}
	// Synced is set just after the store is updated.
	for deadline := time.Now().Add(10 * time.Second); !h.follower.Synced(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("not synced after the first bundle")
		}
	}

	// The stream broke; after backoff the follower reconnects and applies
	// the next root.
	h.waitBackoff()
	h.waitOpened()
	h.streams.scripts <- script{bundles: []*cav1.TrustBundle{msg(3, "cluster.local", a.Root.Raw, b.Root.Raw)}, hold: true}
	snap = h.waitVersion(2)
	if len(snap.Bundle.X509Authorities()) != 2 {
		t.Fatalf("bundle has %d roots after the update, want 2", len(snap.Bundle.X509Authorities()))
	}
	if snap.Version != 2 {
		t.Fatalf("store version %d: an unchanged bundle was stored again", snap.Version)
	}
	if got := counter(t, h.follower.updates); got != 2 {
		t.Fatalf("updates metric %v, want 2", got)
	}
}

func TestRefusesAnotherTrustDomain(t *testing.T) {
	a, _ := testca.NewAuthority(td, start)
	foreign, _ := testca.NewAuthority(spiffeid.RequireTrustDomainFromString("example.org"), start)
	h := newHarness(t)
	h.waitOpened()
	h.streams.scripts <- script{bundles: []*cav1.TrustBundle{msg(1, "cluster.local", a.Root.Raw), msg(2, "example.org", foreign.Root.Raw)}}
	h.waitVersion(1)
	h.waitBackoff() // the bad bundle ended the stream
	h.waitOpened()
	snap, _ := h.store.Load()
	if snap.Bundle.TrustDomain() != td || snap.Version != 1 {
		t.Fatalf("store holds %s bundle at version %d, want the cluster.local one untouched", snap.Bundle.TrustDomain(), snap.Version)
	}
	h.streams.scripts <- script{hold: true}
}

func TestParse(t *testing.T) {
	a, _ := testca.NewAuthority(td, start)
	leaf, err := a.Issue(a.Root.PublicKey, spiffeid.RequireFromString("spiffe://cluster.local/x"), start, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		msg  *cav1.TrustBundle
		ok   bool
	}{
		{"root", msg(1, "cluster.local", a.Root.Raw), true},
		{"trust domain as ID", msg(1, "spiffe://cluster.local", a.Root.Raw), true},
		{"no roots", msg(1, "cluster.local"), false},
		{"bad trust domain", msg(1, "Cluster Local", a.Root.Raw), false},
		{"garbage", msg(1, "cluster.local", []byte("garbage")), false},
		{"leaf as authority", msg(1, "cluster.local", leaf[0].Raw), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := Parse(tc.msg)
			if !tc.ok {
				if !errors.Is(err, ErrInvalidBundle) {
					t.Fatalf("error %v, want ErrInvalidBundle", err)
				}
				return
			}
			if err != nil || b.TrustDomain() != td {
				t.Fatalf("Parse = %v, %v", b, err)
			}
		})
	}
}

// TestTaintedIssuerAsksForRenewalOnce: a bundle that marks the authority the
// agent's certificate chains through as tainted asks for a renewal at once,
// once for that certificate; a certificate that does not chain through it,
// and an SVID restored later under it, are judged on their own.
func TestTaintedIssuerAsksForRenewalOnce(t *testing.T) {
	for _, tc := range []struct {
		name  string
		taint func(a *testca.Authority) []byte
	}{
		{"intermediate", func(a *testca.Authority) []byte { return a.Inter.Raw }},
		{"root", func(a *testca.Authority) []byte { return a.Root.Raw }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			old := testca.New(t, td, start)
			fresh := testca.New(t, td, start)
			store := identity.New()
			store.SetSVID(svidOf(t, old))
			asks := make(chan string, 10)
			sc := &streams{scripts: make(chan script, 10), opened: make(chan struct{}, 10)}
			f, err := New(Config{CA: sc, Store: store, Clock: clocktesting.NewFakeClock(start),
				Renew: func(r string) { asks <- r }})
			if err != nil {
				t.Fatal(err)
			}
			ctx, cancel := context.WithCancel(context.Background())
			done := make(chan error, 1)
			go func() { done <- f.Run(ctx) }()
			defer func() { cancel(); <-done }()

			b := msg(1, "cluster.local", old.Root.Raw, fresh.Root.Raw)
			b.TaintedAuthorities = [][]byte{tc.taint(old)}
			sc.scripts <- script{bundles: []*cav1.TrustBundle{b}, hold: true}
			select {
			case <-asks:
			case <-time.After(10 * time.Second):
				t.Fatal("no renewal asked for a certificate under a tainted authority")
			}
			// Renewed under the replacement: nothing more to ask.
			store.SetSVID(svidOf(t, fresh))
			select {
			case r := <-asks:
				t.Fatalf("asked again (%s) for a certificate that does not chain through the tainted authority", r)
			case <-time.After(200 * time.Millisecond):
			}
			// A certificate under the tainted authority comes back (a
			// renewal answered before the CA switched): asked again, once.
			store.SetSVID(svidOf(t, old))
			select {
			case <-asks:
			case <-time.After(10 * time.Second):
				t.Fatal("no renewal asked for a new certificate under the tainted authority")
			}
		})
	}
}

func svidOf(t *testing.T, a *testca.Authority) *x509svid.SVID {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	chain, err := a.Issue(key.Public(), spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"), start, time.Hour)
	if err != nil {
		t.Fatal(err)
	}
	return &x509svid.SVID{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/b"), Certificates: chain[:2], PrivateKey: key}
}
