package rotation

import (
	"bytes"
	"context"
	"crypto"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log/slog"
	"math/big"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/agent/backoff"
	"github.com/trustmesh/trustmesh/agent/identity"
	"github.com/trustmesh/trustmesh/agent/internal/testca"
	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td      = spiffeid.RequireTrustDomainFromString("cluster.local")
	ownID   = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/cart")
	otherID = spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/payments")
	start   = time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
)

// fakeCA is the Issuer, backed by a real test authority. It checks the
// credential as the CA does: a known token, or a certificate that verifies
// under the authority's bundle now.
type fakeCA struct {
	auth  *testca.Authority
	clock *clocktesting.FakeClock

	mu       sync.Mutex
	down     bool
	override spiffeid.ID
	refuse   bool
	// tokenRefusal, when set, refuses every token as the CA refuses a
	// join token: Unauthenticated, with this api/ca/v1 reason ("-" for
	// none, as a CA that sends no detail; "denied" for PermissionDenied
	// without one).
	tokenRefusal string
	calls        []string
}

func (f *fakeCA) IssueWithToken(_ context.Context, token string, csr []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "token")
	if f.down {
		return nil, status.Error(codes.Unavailable, "connection refused")
	}
	if f.tokenRefusal == "-" {
		return nil, status.Error(codes.Unauthenticated, "authentication failed")
	}
	if f.tokenRefusal == "denied" {
		return nil, status.Error(codes.PermissionDenied, "permission denied")
	}
	if f.tokenRefusal != "" {
		st, err := status.New(codes.Unauthenticated, "authentication failed: the join token was refused").
			WithDetails(&errdetails.ErrorInfo{Domain: cav1.ErrorDomain, Reason: f.tokenRefusal})
		if err != nil {
			return nil, err
		}
		return nil, st.Err()
	}
	if token != "join-token" {
		return nil, status.Error(codes.Unauthenticated, "authentication failed")
	}
	return f.sign(ownID, csr, ttl)
}

func (f *fakeCA) Renew(_ context.Context, cert tls.Certificate, csr []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.calls = append(f.calls, "renew")
	if f.down {
		return nil, status.Error(codes.Unavailable, "connection refused")
	}
	id, _, err := x509svid.ParseAndVerify(cert.Certificate, f.auth.Bundle(), x509svid.WithTime(f.clock.Now()))
	if err != nil || f.refuse {
		return nil, status.Error(codes.Unauthenticated, "authentication failed")
	}
	return f.sign(id, csr, ttl)
}

func (f *fakeCA) sign(id spiffeid.ID, csr []byte, ttl time.Duration) ([]*x509.Certificate, error) {
	if !f.override.IsZero() {
		id = f.override
	}
	if ttl == 0 {
		ttl = time.Hour // the CA's default
	}
	return f.auth.SignCSR(csr, id, f.clock.Now(), ttl)
}

func (f *fakeCA) set(fn func(*fakeCA)) {
	f.mu.Lock()
	defer f.mu.Unlock()
	fn(f)
}

func (f *fakeCA) callLog() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.calls...)
}

type harness struct {
	t     *testing.T
	clock *clocktesting.FakeClock
	ca    *fakeCA
	store *identity.Store
	mgr   *Manager
	// done delivers Run's result; ended is set once a test took it.
	done  chan error
	ended bool
}

// newHarness starts a manager with a bundle in the store, TTL 1h and no
// jitter (renewal at exactly 30m). Edit cfg before it starts with mod.
func newHarness(t *testing.T, mod func(*Config)) *harness {
	t.Helper()
	fc := clocktesting.NewFakeClock(start)
	auth := testca.New(t, td, start)
	h := &harness{t: t, clock: fc, ca: &fakeCA{auth: auth, clock: fc}, store: identity.New()}
	h.store.SetBundle(auth.Bundle())
	cfg := Config{
		Issuer: h.ca,
		Token:  StaticToken("join-token"),
		Store:  h.store,
		Clock:  fc,
		TTL:    time.Hour,
		Rand:   func() float64 { return 0.5 },
	}
	if mod != nil {
		mod(&cfg)
	}
	var err error
	h.mgr, err = New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	h.done = make(chan error, 1)
	go func() { h.done <- h.mgr.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		if h.ended {
			return
		}
		if err := <-h.done; !errors.Is(err, context.Canceled) {
			t.Errorf("Run returned %v, want context.Canceled", err)
		}
	})
	return h
}

// stopped waits for Run to return on its own, and returns its error.
func (h *harness) stopped() error {
	h.t.Helper()
	select {
	case err := <-h.done:
		h.ended = true
		return err
	case <-time.After(10 * time.Second):
		h.t.Fatal("the manager did not stop")
		return nil
	}
}

// running reports whether Run is still going; if it returned, the test
// fails with its error.
func (h *harness) running() bool {
	h.t.Helper()
	select {
	case err := <-h.done:
		h.ended = true
		h.t.Errorf("Run returned %v", err)
		return false
	default:
		return true
	}
}

// settle waits until the manager is blocked on the fake clock, so that what
// it has done so far is complete.
func (h *harness) settle() {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !h.clock.HasWaiters() {
		if time.Now().After(deadline) {
			h.t.Fatal("manager never waited on the clock")
		}
		time.Sleep(time.Millisecond)
	}
}

// step advances the fake clock and lets the manager act on it.
func (h *harness) step(d time.Duration) {
	h.t.Helper()
	h.settle()
	h.clock.Step(d)
	h.settle()
}

func (h *harness) svid() *x509svid.SVID {
	snap, _ := h.store.Load()
	return snap.SVID
}

func TestIssuesWithTokenThenRenewsOverMTLSAtHalfLife(t *testing.T) {
	h := newHarness(t, nil)
	h.settle()
	first := h.svid()
	if first == nil || first.ID != ownID {
		t.Fatalf("after start SVID = %v, want one for %s", first, ownID)
	}
	if got := h.mgr.ID(); got != ownID {
		t.Fatalf("learned ID %s, want %s", got, ownID)
	}

	h.step(29 * time.Minute)
	if h.svid() != first {
		t.Fatal("renewed before half-life")
	}
	h.step(time.Minute)
	second := h.svid()
	if second == first {
		t.Fatal("not renewed at half-life")
	}
	if second.ID != ownID {
		t.Fatalf("renewed SVID has ID %s", second.ID)
	}
	if second.Certificates[0].PublicKey.(interface{ Equal(crypto.PublicKey) bool }).Equal(first.Certificates[0].PublicKey) {
		t.Fatal("renewal reused the key")
	}
	if got, want := h.ca.callLog(), []string{"token", "renew"}; !equal(got, want) {
		t.Fatalf("CA calls %v, want %v (first issuance by token, renewal over mTLS)", got, want)
	}
	if got := counterValue(t, h.mgr.rotations); got != 2 {
		t.Fatalf("rotations metric %v, want 2", got)
	}
}

func TestCADownAtRenewalKeepsServingAndRecovers(t *testing.T) {
	h := newHarness(t, nil)
	h.settle()
	first := h.svid()
	h.ca.set(func(f *fakeCA) { f.down = true })

	h.step(30 * time.Minute) // renewal fails
	for range 3 {
		h.step(time.Minute) // backoff retries fail too (steps cap at 1m)
	}
	if h.svid() != first {
		t.Fatal("the current certificate is not served while the CA is down")
	}
	if got := counterValue(t, h.mgr.failures.WithLabelValues(ReasonUnavailable)); got < 4 {
		t.Fatalf("ca_unavailable failures = %v, want at least 4", got)
	}

	h.ca.set(func(f *fakeCA) { f.down = false })
	h.step(time.Minute)
	renewed := h.svid()
	if renewed == first || renewed == nil || renewed.ID != ownID {
		t.Fatalf("no renewal after the CA came back: %v", renewed)
	}
	calls := h.ca.callLog()
	if calls[len(calls)-1] != "renew" {
		t.Fatalf("recovery used %q, want renewal over mTLS", calls[len(calls)-1])
	}
}

func TestRefusesCertificateForAnotherIdentity(t *testing.T) {
	t.Run("at renewal", func(t *testing.T) {
		h := newHarness(t, nil)
		h.settle()
		first := h.svid()
		h.ca.set(func(f *fakeCA) { f.override = otherID })
		h.step(30 * time.Minute)
		h.step(time.Minute)
		if h.svid() != first {
			t.Fatalf("agent replaced its certificate with %s's", h.svid().ID)
		}
		if got := counterValue(t, h.mgr.failures.WithLabelValues(ReasonIdentityMismatch)); got < 2 {
			t.Fatalf("identity_mismatch failures = %v, want at least 2", got)
		}
		h.ca.set(func(f *fakeCA) { f.override = spiffeid.ID{} })
		h.step(time.Minute)
		if s := h.svid(); s == first || s.ID != ownID {
			t.Fatal("no renewal once the CA issued the right identity again")
		}
	})
	t.Run("at first issuance with a pinned ID", func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.ID = otherID })
		h.settle()
		if s := h.svid(); s != nil {
			t.Fatalf("agent pinned to %s accepted a certificate for %s", otherID, s.ID)
		}
		if got := counterValue(t, h.mgr.failures.WithLabelValues(ReasonIdentityMismatch)); got != 1 {
			t.Fatalf("identity_mismatch failures = %v, want 1", got)
		}
	})
}

func TestExpiredCertificateIsWithdrawnAndTokenUsedAgain(t *testing.T) {
	h := newHarness(t, nil)
	h.settle()
	h.ca.set(func(f *fakeCA) { f.down = true })
	h.step(30 * time.Minute)
	for h.clock.Now().Before(start.Add(time.Hour)) {
		h.step(time.Minute)
	}
	if s := h.svid(); s != nil {
		t.Fatalf("expired certificate still served (expired %s, now %s)", s.Certificates[0].NotAfter, h.clock.Now())
	}
	h.ca.set(func(f *fakeCA) { f.down = false })
	h.step(time.Minute)
	s := h.svid()
	if s == nil || s.ID != ownID {
		t.Fatal("no new certificate after the CA came back")
	}
	calls := h.ca.callLog()
	if calls[len(calls)-1] != "token" {
		t.Fatalf("after expiry the agent used %q, want the token", calls[len(calls)-1])
	}
}

func TestRefusedRenewalFallsBackToToken(t *testing.T) {
	h := newHarness(t, nil)
	h.settle()
	first := h.svid()
	h.ca.set(func(f *fakeCA) { f.refuse = true })
	h.step(30 * time.Minute)
	if s := h.svid(); s == first || s.ID != ownID {
		t.Fatal("no certificate from the token after the renewal was refused")
	}
	if got, want := h.ca.callLog(), []string{"token", "renew", "token"}; !equal(got, want) {
		t.Fatalf("CA calls %v, want %v", got, want)
	}
}

func TestWaitsForTrustBundle(t *testing.T) {
	fc := clocktesting.NewFakeClock(start)
	auth := testca.New(t, td, start)
	ca := &fakeCA{auth: auth, clock: fc}
	store := identity.New()
	m, err := New(Config{Issuer: ca, Token: StaticToken("join-token"), Store: store, Clock: fc})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx) }()

	_, changed := store.Load()
	select {
	case <-changed:
		t.Fatal("the manager changed the store before it had a bundle")
	case <-time.After(50 * time.Millisecond):
	}
	if calls := ca.callLog(); len(calls) != 0 {
		t.Fatalf("CA called %v before the agent had a bundle to verify with", calls)
	}
	store.SetBundle(auth.Bundle())
	for {
		snap, changed := store.Load()
		if snap.SVID != nil {
			break
		}
		select {
		case <-changed:
		case <-time.After(10 * time.Second):
			t.Fatal("no SVID after the bundle arrived")
		}
	}
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Run returned %v", err)
	}
}

func TestRenewalTimeJitter(t *testing.T) {
	for _, tc := range []struct {
		name string
		rand float64
		want time.Duration
	}{
		{"lowest", 0, 27 * time.Minute},
		{"middle", 0.5, 30 * time.Minute},
		{"highest", 0.999999, 33 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			auth := testca.New(t, td, start)
			m := &Manager{cfg: Config{Rand: func() float64 { return tc.rand }, Logger: discard()}}
			s := auth.SVID(t, ownID, start, time.Hour)
			got := m.renewalTime(s).Sub(start)
			if d := got - tc.want; d < -time.Second || d > time.Second {
				t.Fatalf("renewal after %s, want %s", got, tc.want)
			}
		})
	}
}

func TestNewRejectsBadConfig(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"empty", Config{}},
		{"negative TTL", Config{Issuer: &fakeCA{}, Store: identity.New(), Clock: clocktesting.NewFakeClock(start), TTL: -time.Second}},
		{"unknown key type", Config{Issuer: &fakeCA{}, Store: identity.New(), Clock: clocktesting.NewFakeClock(start), KeyType: "dsa"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := New(tc.cfg); err == nil {
				t.Fatal("New accepted a bad config")
			}
		})
	}
}

func TestFileTokenRereadsFile(t *testing.T) {
	path := t.TempDir() + "/token"
	src := FileToken(path)
	if _, err := src.Token(); err == nil {
		t.Fatal("missing token file accepted")
	}
	for _, tok := range []string{"first", "second"} {
		if err := os.WriteFile(path, []byte(tok+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		got, err := src.Token()
		if err != nil || got != tok {
			t.Fatalf("Token() = %q, %v; want %q", got, err, tok)
		}
	}
}

func equal(a, b []string) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func countCalls(calls []string, kind string) int {
	n := 0
	for _, c := range calls {
		if c == kind {
			n++
		}
	}
	return n
}

// TestRefusedJoinTokenStopsTheAgent: a join token the CA refuses never
// works later, so the agent stops at once, with what to do, instead of
// retrying for ever.
func TestRefusedJoinTokenStopsTheAgent(t *testing.T) {
	for reason, says := range map[string]string{
		cav1.JoinTokenMalformed: "malformed",
		cav1.JoinTokenUnknown:   "never created",
		cav1.JoinTokenUsed:      "used already",
		cav1.JoinTokenExpired:   "expired",
		cav1.JoinTokenRevoked:   "revoked",
	} {
		t.Run(reason, func(t *testing.T) {
			h := newHarness(t, func(c *Config) {
				c.JoinToken = true
				c.Issuer.(*fakeCA).tokenRefusal = reason
			})
			err := h.stopped()
			var refused *JoinTokenRefusedError
			if !errors.As(err, &refused) {
				t.Fatalf("Run = %v; want a JoinTokenRefusedError", err)
			}
			if refused.Reason != reason {
				t.Errorf("reason %q, want %q", refused.Reason, reason)
			}
			if msg := err.Error(); !strings.Contains(msg, says) || !strings.Contains(msg, "trustmesh ca token create --data-dir") {
				t.Errorf("the agent says %q; want it to say %q and how to make a new token", msg, says)
			}
			if got := h.ca.callLog(); len(got) != 1 {
				t.Errorf("CA calls %v; want one try of the token", got)
			}
		})
	}
}

// TestRefusalWithoutAReasonIsRetried: only the CA's join-token ErrorInfo
// says a token is dead. An Unauthenticated or PermissionDenied without it
// (a CA mid-restart, a proxy, a CSR problem) is retried with backoff, and
// the agent enrols once the CA accepts the token.
func TestRefusalWithoutAReasonIsRetried(t *testing.T) {
	for _, refusal := range []string{"-", "denied"} {
		t.Run(refusal, func(t *testing.T) {
			h := newHarness(t, func(c *Config) {
				c.JoinToken = true
				c.Issuer.(*fakeCA).tokenRefusal = refusal
			})
			for i := 0; i < 3; i++ {
				h.step(10 * time.Minute)
			}
			if !h.running() {
				t.Fatal("the agent stopped on a refusal that carried no join-token reason")
			}
			if n := countCalls(h.ca.callLog(), "token"); n < 3 {
				t.Fatalf("%d tries of the token; want retries", n)
			}
			if h.svid() != nil {
				t.Fatal("an SVID while the CA refuses")
			}
			h.ca.set(func(f *fakeCA) { f.tokenRefusal = "" })
			h.step(10 * time.Minute)
			if got := h.svid(); got == nil || got.ID != ownID {
				t.Fatalf("SVID %v after the CA accepted the token; want %s", got, ownID)
			}
		})
	}
}

// TestRefusedJoinTokenServesTheCurrentCertificateToTheEnd: with a valid
// certificate in hand the agent keeps serving it, and stops once it expires
// with nothing left to renew with.
func TestRefusedJoinTokenServesTheCurrentCertificateToTheEnd(t *testing.T) {
	h := newHarness(t, func(c *Config) { c.JoinToken = true })
	h.settle()
	first := h.svid()
	h.ca.set(func(f *fakeCA) { f.refuse, f.tokenRefusal = true, cav1.JoinTokenUsed })
	h.step(30 * time.Minute)
	if h.svid() != first || !h.running() {
		t.Fatal("the agent stopped serving a valid certificate when its token was refused")
	}
	for h.clock.Now().Before(start.Add(time.Hour)) {
		h.settle() // fails if the manager stopped before the certificate expired
		h.clock.Step(time.Minute)
	}
	var refused *JoinTokenRefusedError
	if err := h.stopped(); !errors.As(err, &refused) || refused.Reason != cav1.JoinTokenUsed {
		t.Fatalf("Run = %v; want it to stop on the used token once the certificate expired", err)
	}
	if h.svid() != nil {
		t.Fatal("an expired certificate is still served")
	}
}

// TestTokenRefusalsThatMayHealAreRetried: a service-account token (which
// the kubelet refreshes) and a CA that cannot be reached are retried with
// backoff; the agent recovers when they heal.
func TestTokenRefusalsThatMayHealAreRetried(t *testing.T) {
	t.Run("service-account token refused", func(t *testing.T) {
		h := newHarness(t, func(c *Config) { c.Issuer.(*fakeCA).tokenRefusal = "-" })
		for range 3 {
			h.step(time.Minute)
		}
		if n := countCalls(h.ca.callLog(), "token"); n < 3 || !h.running() {
			t.Fatalf("%d tries of a refused service-account token; want retries", n)
		}
	})
	t.Run("join token while the CA is unavailable", func(t *testing.T) {
		h := newHarness(t, func(c *Config) {
			c.JoinToken = true
			c.Issuer.(*fakeCA).down = true
		})
		for range 3 {
			h.step(time.Minute)
		}
		if n := countCalls(h.ca.callLog(), "token"); n < 3 || !h.running() {
			t.Fatalf("%d tries while the CA was down; want retries", n)
		}
		h.ca.set(func(f *fakeCA) { f.down = false })
		h.step(time.Minute)
		if s := h.svid(); s == nil || s.ID != ownID {
			t.Fatal("no certificate once the CA was back")
		}
	})
}

// syncBuffer is a bytes.Buffer for a logger on another goroutine.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// TestLogsSerialsAsTheJournalSpellsThem: the agent logs a certificate's
// serial in lowercase hex, as the CA's journal and trustmesh audit do, so
// that one can be searched for the other.
func TestLogsSerialsAsTheJournalSpellsThem(t *testing.T) {
	var logs syncBuffer
	h := newHarness(t, func(c *Config) { c.Logger = slog.New(slog.NewTextHandler(&logs, nil)) })
	h.settle()
	// Serials below 10 read the same in both bases: renew past them.
	for i := 0; i < 20 && h.svid().Certificates[0].SerialNumber.Cmp(big.NewInt(10)) < 0; i++ {
		h.step(30 * time.Minute)
	}
	sn := h.svid().Certificates[0].SerialNumber
	if sn.Cmp(big.NewInt(10)) < 0 {
		t.Fatalf("serial %v stayed below 10", sn)
	}
	if want := "serial=" + sn.Text(16) + " "; !strings.Contains(logs.String(), want) {
		t.Fatalf("logs do not name the serial as %q:\n%s", want, logs.String())
	}
}

// RenewNow renews at once, not at half-life, and a forced renewal that
// fails is retried with backoff rather than put off to half-life.
func TestRenewNowRenewsAtOnceAndRetriesUntilDone(t *testing.T) {
	h := newHarness(t, func(c *Config) {
		c.Backoff = backoff.Backoff{Initial: time.Second, Max: time.Second}
	})
	h.settle()
	first := h.svid()
	if first == nil {
		t.Fatal("no SVID after start")
	}
	h.step(time.Minute)
	h.mgr.RenewNow("issuer tainted")
	second := h.changedFrom(first)
	if second == first {
		t.Fatal("RenewNow did not renew before half-life")
	}

	h.ca.set(func(f *fakeCA) { f.down = true })
	h.mgr.RenewNow("issuer tainted")
	for len(h.ca.callLog()) < 3 {
		time.Sleep(time.Millisecond)
	}
	h.settle()
	if h.svid() != second {
		t.Fatal("the certificate changed while the CA was down")
	}
	h.ca.set(func(f *fakeCA) { f.down = false })
	h.clock.Step(time.Second)
	third := h.changedFrom(second)
	if third == second {
		t.Fatal("a failed forced renewal was not retried after its backoff")
	}
	// Answered: the next renewal is at half-life again.
	h.step(10 * time.Minute)
	if h.svid() != third {
		t.Fatal("renewed again without being asked, before half-life")
	}
	if got := h.ca.callLog(); !equal(got, []string{"token", "renew", "renew", "renew"}) {
		t.Fatalf("CA calls %v, want token then three renewals (one refused as down)", got)
	}
}

// changedFrom waits (in real time, up to 10 s) for the SVID to differ from
// prev, then for the manager to wait on the clock again, and returns it.
func (h *harness) changedFrom(prev *x509svid.SVID) *x509svid.SVID {
	h.t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for h.svid() == prev && time.Now().Before(deadline) {
		time.Sleep(time.Millisecond)
	}
	h.settle()
	return h.svid()
}
