package authn

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
)

// jwksServer publishes a key set the test changes, and counts fetches.
type jwksServer struct {
	mu      sync.Mutex
	keys    []jose.JSONWebKey
	fail    bool
	fetches atomic.Int64
}

func (s *jwksServer) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if r.URL.Path != jwksPath {
		http.NotFound(w, r)
		return
	}
	s.fetches.Add(1)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.fail {
		http.Error(w, "unavailable", http.StatusServiceUnavailable)
		return
	}
	_ = json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: s.keys})
}

func (s *jwksServer) publish(keys ...jose.JSONWebKey) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.keys, s.fail = keys, false
}

func (s *jwksServer) failing() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.fail = true
}

type signingKey struct {
	kid  string
	priv *ecdsa.PrivateKey
}

func newSigningKey(t *testing.T, kid string) signingKey {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return signingKey{kid: kid, priv: k}
}

func (k signingKey) public() jose.JSONWebKey {
	return jose.JSONWebKey{Key: &k.priv.PublicKey, KeyID: k.kid, Algorithm: string(jose.ES256), Use: "sig"}
}

// token signs claims; an empty kid leaves the header without one.
func (k signingKey) token(t *testing.T, kid string) string {
	t.Helper()
	opts := &jose.SignerOptions{}
	if kid != "" {
		opts = opts.WithHeader("kid", kid)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: k.priv}, opts)
	if err != nil {
		t.Fatal(err)
	}
	return sign(t, signer)
}

func sign(t *testing.T, signer jose.Signer) string {
	t.Helper()
	claims, _ := json.Marshal(map[string]any{"aud": []string{"istio-ca"}, "exp": time.Now().Add(time.Hour).Unix(), "sub": "system:serviceaccount:a:b"})
	jws, err := signer.Sign(claims)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func restClientFor(t *testing.T, url string) rest.Interface {
	t.Helper()
	c, err := rest.RESTClientFor(&rest.Config{Host: url, APIPath: "/api", ContentConfig: rest.ContentConfig{
		GroupVersion: &corev1.SchemeGroupVersion, NegotiatedSerializer: scheme.Codecs.WithoutConversion()}})
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func TestIssuerKeys(t *testing.T) {
	ctx := context.Background()
	srv := &jwksServer{}
	hs := httptest.NewServer(srv)
	defer hs.Close()
	a, b, c := newSigningKey(t, "a"), newSigningKey(t, "b"), newSigningKey(t, "c")
	srv.publish(a.public())
	clk := clocktesting.NewFakeClock(time.Now())
	k := newIssuerKeys(restClientFor(t, hs.URL), clk)

	if err := k.check(ctx, a.token(t, "a")); err != nil {
		t.Fatalf("a token under a published key: %v", err)
	}
	if err := k.check(ctx, a.token(t, "")); err != nil {
		t.Fatalf("a token naming no key, under a published one: %v", err)
	}
	if err := k.check(ctx, b.token(t, "a")); !errors.Is(err, errBadSignature) {
		t.Fatalf("another key's signature under a published key ID: %v, want errBadSignature", err)
	}
	hmac, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: []byte("0123456789abcdef0123456789abcdef")}, (&jose.SignerOptions{}).WithHeader("kid", "a"))
	if err != nil {
		t.Fatal(err)
	}
	if err := k.check(ctx, sign(t, hmac)); !errors.Is(err, errBadSignature) {
		t.Fatalf("an HMAC token: %v, want errBadSignature", err)
	}
	if n := srv.fetches.Load(); n != 1 {
		t.Fatalf("%d fetches, want 1", n)
	}

	// Made-up key IDs fetch at most once per 30 s.
	for round := range 2 {
		for range 10 {
			if err := k.check(ctx, b.token(t, "made-up")); !errors.Is(err, errBadSignature) {
				t.Fatalf("an unknown key ID: %v, want errBadSignature", err)
			}
		}
		if n := srv.fetches.Load(); n != int64(1+round) {
			t.Fatalf("%d fetches after %d rounds of 10 unknown key IDs 31 s apart, want %d", n, round+1, 1+round)
		}
		clk.Step(31 * time.Second)
	}

	// The apiserver rotates to key b: its tokens pass once the keys are
	// fetched again.
	if err := k.check(ctx, b.token(t, "made-up")); !errors.Is(err, errBadSignature) { // a fetch now
		t.Fatal(err)
	}
	srv.publish(a.public(), b.public())
	if err := k.check(ctx, b.token(t, "b")); !errors.Is(err, errBadSignature) {
		t.Fatalf("a new key inside the refetch window: %v, want refused", err)
	}
	clk.Step(31 * time.Second)
	if err := k.check(ctx, b.token(t, "b")); err != nil {
		t.Fatalf("a new key after the refetch window: %v", err)
	}

	// A failed fetch leaves the known keys working and sends tokens under
	// unknown ones to review.
	srv.failing()
	clk.Step(31 * time.Second)
	if err := k.check(ctx, c.token(t, "c")); !errors.Is(err, errNoKeys) {
		t.Fatalf("an unknown key ID while the keys cannot be read: %v, want errNoKeys", err)
	}
	if err := k.check(ctx, a.token(t, "a")); err != nil {
		t.Fatalf("a known key while the keys cannot be read: %v", err)
	}

	// A set with no key would refuse everything: it counts as none.
	empty := &jwksServer{}
	hs2 := httptest.NewServer(empty)
	defer hs2.Close()
	k2 := newIssuerKeys(restClientFor(t, hs2.URL), clk)
	if err := k2.check(ctx, a.token(t, "a")); !errors.Is(err, errNoKeys) {
		t.Fatalf("an empty key set: %v, want errNoKeys", err)
	}
}

// Whitespace, padding or stray bits make a different string of the same
// token: each would be a new entry in the caches and a new review.
func TestPrecheckRefusesNonCanonicalTokens(t *testing.T) {
	k, err := NewKubernetes(KubernetesConfig{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"), Client: fake.NewClientset()})
	if err != nil {
		t.Fatal(err)
	}
	if k.keys != nil {
		t.Fatal("a fake clientset has no REST client; the key check must be off, not panic")
	}
	good := newSigningKey(t, "a").token(t, "a")
	now := time.Now()
	if _, err := k.precheck(good, now); err != nil {
		t.Fatalf("the canonical token: %v", err)
	}
	dot := strings.LastIndex(good, ".")
	sig := good[dot+1:]
	last := strings.IndexByte(base64URLAlphabet, sig[len(sig)-1])
	for name, tok := range map[string]string{
		"a space in the header":      good[:4] + " " + good[4:],
		"a newline in the signature": good[:dot+5] + "\n" + good[dot+5:],
		"padding":                    good + "=",
		"stray trailing bits":        good[:len(good)-1] + string(base64URLAlphabet[last^1]),
		"standard base64":            strings.ReplaceAll(good, "-", "+"),
	} {
		if tok == good {
			continue
		}
		_, err := k.precheck(tok, now)
		if r, ok := ca.AsRefusal(err); !ok || r.Reason != ca.ReasonTokenMalformed {
			t.Errorf("%s: %v, want refused as malformed", name, err)
		}
	}
}
