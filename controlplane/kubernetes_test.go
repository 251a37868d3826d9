package controlplane_test

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// One real kube-apiserver for the package, started by the first test that
// needs it.
var shared kubeapi.Shared

func TestMain(m *testing.M) { shared.Main(m) }

func kube(t *testing.T) (*rest.Config, kubernetes.Interface) {
	t.Helper()
	kubeCfg := shared.Config(t)
	return kubeCfg, kubernetes.NewForConfigOrDie(kubeCfg)
}

type cluster struct {
	t  *testing.T
	cs kubernetes.Interface
	ns string
}

func (c *cluster) serviceAccount(name string) *corev1.ServiceAccount {
	c.t.Helper()
	sa, err := c.cs.CoreV1().ServiceAccounts(c.ns).Create(context.Background(),
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{})
	if err != nil {
		c.t.Fatal(err)
	}
	return sa
}

func (c *cluster) pod(name, sa string) *corev1.Pod {
	c.t.Helper()
	p, err := c.cs.CoreV1().Pods(c.ns).Create(context.Background(), &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Spec: corev1.PodSpec{ServiceAccountName: sa, AutomountServiceAccountToken: new(bool),
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		c.t.Fatal(err)
	}
	return p
}

// token asks the TokenRequest API for a token of sa, bound to pod when given,
// as the kubelet does for a projected token.
func (c *cluster) token(sa, audience string, pod *corev1.Pod) string {
	c.t.Helper()
	exp := int64(600)
	req := &authv1.TokenRequest{Spec: authv1.TokenRequestSpec{Audiences: []string{audience}, ExpirationSeconds: &exp}}
	if pod != nil {
		req.Spec.BoundObjectRef = &authv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: pod.Name, UID: pod.UID}
	}
	resp, err := c.cs.CoreV1().ServiceAccounts(c.ns).CreateToken(context.Background(), sa, req, metav1.CreateOptions{})
	if err != nil {
		c.t.Fatal(err)
	}
	return resp.Status.Token
}

// deleteServiceAccount deletes the account and returns once the apiserver
// refuses its tokens. The apiserver checks a token's service account in
// its own cache, which learns of the deletion a moment after the delete
// returns: a make test run once saw a stale token accepted. So a token of
// the helper's own is reviewed, outside any client a test counts, until
// the apiserver refuses it.
func (c *cluster) deleteServiceAccount(name string) {
	c.t.Helper()
	ctx := context.Background()
	probe := c.token(name, "istio-ca", nil)
	if err := c.cs.CoreV1().ServiceAccounts(c.ns).Delete(ctx, name, metav1.DeleteOptions{}); err != nil {
		c.t.Fatal(err)
	}
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		tr, err := c.cs.AuthenticationV1().TokenReviews().Create(ctx, &authv1.TokenReview{
			Spec: authv1.TokenReviewSpec{Token: probe, Audiences: []string{"istio-ca"}}}, metav1.CreateOptions{})
		if err == nil && !tr.Status.Authenticated {
			return
		}
		if time.Now().After(deadline) {
			c.t.Fatalf("the apiserver still accepts a token of deleted service account %s after 30 s: %v", name, err)
		}
	}
}

func TestKubernetesServiceAccountTokens(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	ns := "team-a"
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cl := &cluster{t: t, cs: cs, ns: ns}
	cl.serviceAccount("web")
	cl.serviceAccount("gone")
	cl.serviceAccount("temp")
	webPod := cl.pod("web-0", "web")
	webID := spiffeid.RequireFromString("spiffe://cluster.local/ns/team-a/sa/web")

	e := start(t, func(c *controlplane.Config) {
		c.Kubernetes.RestConfig = cfg
		c.Kubernetes.Mode = controlplane.KubernetesOn
	})
	// istio-agent reaches istiod by its Service name; trustmesh's default
	// serving names include the equivalent.
	const serverName = "trustmesh.trustmesh-system.svc"

	t.Run("a pod's token gets its service account's SPIFFE ID", func(t *testing.T) {
		c := newClient(t)
		resp, err := request(ctx, e.dial(nil, serverName), cl.token("web", "istio-ca", webPod), c.csr(t, webID.String()), 24*time.Hour)
		if err != nil {
			t.Fatal(err)
		}
		e.checkResponse(resp, webID)
	})
	refused := []struct {
		name  string
		token func() string
		want  codes.Code
	}{
		{"a token for another audience", func() string { return cl.token("web", "https://kubernetes.default.svc", webPod) }, codes.Unauthenticated},
		{"a malformed token", func() string { return "not-a-jwt" }, codes.Unauthenticated},
		{"a token with a forged signature", func() string {
			tok := cl.token("web", "istio-ca", webPod)
			return tok[:strings.LastIndex(tok, ".")+1] + "AAAA" + tok[strings.LastIndex(tok, ".")+5:]
		}, codes.Unauthenticated},
		{"a token whose service account was deleted", func() string {
			tok := cl.token("gone", "istio-ca", nil)
			cl.deleteServiceAccount("gone")
			return tok
		}, codes.Unauthenticated},
	}
	for _, tc := range refused {
		t.Run(tc.name, func(t *testing.T) {
			_, err := request(ctx, e.dial(nil, serverName), tc.token(), newClient(t).csr(t, ""), time.Hour)
			wantCode(t, err, tc.want)
		})
	}
	t.Run("a CSR asking for another identity", func(t *testing.T) {
		c := newClient(t)
		_, err := request(ctx, e.dial(nil, serverName), cl.token("web", "istio-ca", webPod),
			c.csr(t, "spiffe://cluster.local/ns/team-a/sa/admin"), time.Hour)
		wantCode(t, err, codes.InvalidArgument)
	})
	t.Run("renewal is refused once the service account is deleted", func(t *testing.T) {
		tempID := spiffeid.RequireFromString("spiffe://cluster.local/ns/team-a/sa/temp")
		c := newClient(t)
		e.obtain(c, cl.token("temp", "istio-ca", nil), tempID)
		e.obtain(c, "", tempID) // renewal works while the account exists
		cl.deleteServiceAccount("temp")
		// serve's service-account cache hears of the deletion by its
		// watch, a moment after the apiserver: until then a renewal may
		// pass, as the cache's documented lag allows.
		var err error
		for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
			_, err = request(ctx, e.dial(c, serverName), "", c.csr(t, ""), time.Hour)
			if err != nil || time.Now().After(deadline) {
				break
			}
		}
		wantCode(t, err, codes.PermissionDenied)
	})
	t.Run("an expired token", func(t *testing.T) {
		tok := cl.token("web", "istio-ca", webPod)
		// TokenRequest's shortest lifetime is 10 minutes, from the
		// apiserver's real clock: step the CA's clock 11 minutes past
		// real time, however long the cases before took.
		e.clock.Step(max(11*time.Minute, time.Since(e.clock.Now())+11*time.Minute))
		_, err := request(ctx, e.dial(nil, serverName), tok, newClient(t).csr(t, ""), time.Hour)
		wantCode(t, err, codes.Unauthenticated)
	})
	m := e.metrics()
	for _, want := range []string{`reason="token-audience"`, `reason="token-malformed"`, `reason="token-rejected"`,
		`reason="token-signature"`, `reason="token-expired"`, `reason="service-account-deleted"`, `trustmesh_ca_issued_total{method="kubernetes"} 2`} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
}

// countingTransport counts TokenReviews that reach the apiserver.
type countingTransport struct {
	next    http.RoundTripper
	reviews atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/tokenreviews") {
		c.reviews.Add(1)
	}
	return c.next.RoundTrip(r)
}

// Forged tokens are refused against the apiserver's published keys without
// a review; a flood of tokens that only a review can refuse reaches the
// apiserver only as fast as the rate limit allows; and a good token is
// reviewed once while its review is cached.
func TestTokenReviewsAreRateLimitedAndCached(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "flood"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cl := &cluster{t: t, cs: cs, ns: "flood"}
	cl.serviceAccount("web")
	cl.serviceAccount("gone")
	counter := &countingTransport{}
	counted := rest.CopyConfig(cfg)
	counted.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { counter.next = rt; return counter }
	clk := clocktesting.NewFakeClock(time.Now())
	k, err := authn.NewKubernetes(authn.KubernetesConfig{
		TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"),
		Client:      kubernetes.NewForConfigOrDie(counted),
		Clock:       clk, QPS: 1, Burst: 3, MaxWait: 10 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	good := cl.token("web", "istio-ca", nil)

	// Forged tokens that pass every check but the signature: JWT form,
	// the right audience, not expired, the apiserver's key ID.
	forge := func(i int) string { return good[:strings.LastIndex(good, ".")+1] + fmt.Sprintf("AAAA%04d", i) }
	for i := range 50 {
		_, err := k.Authenticate(ctx, forge(i))
		if r, ok := ca.AsRefusal(err); !ok || r.Reason != ca.ReasonTokenSignature {
			t.Fatalf("forged token %d: %v; want refused for its signature", i, err)
		}
	}
	if n := counter.reviews.Load(); n != 0 {
		t.Fatalf("50 forged tokens sent %d reviews; want none", n)
	}

	// Tokens the apiserver signed for a service account since deleted:
	// only a review can refuse them.
	var stale []string
	for range 50 {
		stale = append(stale, cl.token("gone", "istio-ca", nil))
	}
	cl.deleteServiceAccount("gone")
	var busy, rejected int
	for _, tok := range stale {
		_, err := k.Authenticate(ctx, tok)
		r, ok := ca.AsRefusal(err)
		switch {
		case !ok:
			t.Fatalf("a deleted account's token was accepted: %v", err)
		case r.Reason == ca.ReasonTokenReviewBusy:
			busy++
		case r.Reason == ca.ReasonTokenRejected:
			rejected++
		default:
			t.Fatalf("unexpected refusal %q", r.Reason)
		}
	}
	if n := counter.reviews.Load(); n > 4 || busy < 45 || rejected == 0 {
		t.Fatalf("50 stale tokens sent %d reviews (%d refused as busy, %d rejected); want at most the burst of 3 and a token or so", n, busy, rejected)
	}
	// A refused token presented again is refused without another review.
	var refusedOne string
	for _, tok := range stale {
		if _, err := k.Authenticate(ctx, tok); err != nil {
			if r, _ := ca.AsRefusal(err); r.Reason == ca.ReasonTokenRejected {
				refusedOne = tok
				break
			}
		}
	}
	reviewed := counter.reviews.Load()
	for range 5 {
		if _, err := k.Authenticate(ctx, refusedOne); err == nil {
			t.Fatal("a deleted account's token was accepted")
		}
	}
	if counter.reviews.Load() != reviewed {
		t.Fatal("a token the apiserver just refused was reviewed again")
	}
	before := counter.reviews.Load()
	clk.Step(3 * time.Second) // the bucket refills
	for range 20 {
		if _, err := k.Authenticate(ctx, good); err != nil {
			t.Fatal(err)
		}
	}
	if n := counter.reviews.Load() - before; n != 1 {
		t.Fatalf("20 presentations of one good token sent %d reviews; want 1 (cached)", n)
	}
	clk.Step(31 * time.Second) // past the cache lifetime
	if _, err := k.Authenticate(ctx, good); err != nil {
		t.Fatal(err)
	}
	if n := counter.reviews.Load() - before; n != 2 {
		t.Fatalf("after the cache expired, %d reviews in all; want 2", n)
	}
}

// When the apiserver's keys cannot be read, tokens are reviewed as before:
// the local check only ever refuses, and never fails a good token.
func TestTokensAreReviewedWhenKeysAreUnavailable(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "nokeys"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	cl := &cluster{t: t, cs: cs, ns: "nokeys"}
	cl.serviceAccount("web")
	nowhere := rest.CopyConfig(cfg)
	nowhere.Host = "https://127.0.0.1:1" // nothing listens there
	keys, err := rest.RESTClientFor(withCoreGroup(nowhere))
	if err != nil {
		t.Fatal(err)
	}
	k, err := authn.NewKubernetes(authn.KubernetesConfig{
		TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"),
		Client:      cs, Keys: keys,
	})
	if err != nil {
		t.Fatal(err)
	}
	caller, err := k.Authenticate(ctx, cl.token("web", "istio-ca", nil))
	if err != nil {
		t.Fatalf("a good token was refused while the keys were unavailable: %v", err)
	}
	if caller.ID.String() != "spiffe://cluster.local/ns/nokeys/sa/web" {
		t.Fatalf("caller %s", caller.ID)
	}
	tok := cl.token("web", "istio-ca", nil)
	forged := tok[:strings.LastIndex(tok, ".")+1] + "AAAA" + tok[strings.LastIndex(tok, ".")+5:]
	_, err = k.Authenticate(ctx, forged)
	if r, ok := ca.AsRefusal(err); !ok || r.Reason != ca.ReasonTokenRejected {
		t.Fatalf("a forged token while the keys were unavailable: %v; want the review to refuse it", err)
	}
}

// withCoreGroup sets what rest.RESTClientFor needs to build a client for
// the core API group.
func withCoreGroup(c *rest.Config) *rest.Config {
	c.GroupVersion = &corev1.SchemeGroupVersion
	c.APIPath = "/api"
	c.NegotiatedSerializer = scheme.Codecs.WithoutConversion()
	return c
}
