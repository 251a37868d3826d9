package authn

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"golang.org/x/time/rate"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"
	typedcorev1 "k8s.io/client-go/kubernetes/typed/core/v1"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// DefaultAudience is the audience service-account tokens must carry, as
// Istio's CA expects.
const DefaultAudience = "istio-ca"

// maxJWTSize bounds the tokens that are looked at at all.
const maxJWTSize = 16 << 10

const base64URLAlphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"

// KubernetesConfig configures the Kubernetes authenticator.
type KubernetesConfig struct {
	TrustDomain spiffeid.TrustDomain
	Client      kubernetes.Interface
	// Audience the token must be bound to. Default "istio-ca".
	Audience string
	// Clock drives token expiry, the review cache and the rate limiter.
	Clock clock.Clock
	// QPS and Burst bound TokenReviews sent to the apiserver. Defaults 50, 100.
	QPS   float64
	Burst int
	// MaxWait is how long a request may wait for a TokenReview slot before it
	// is refused as unavailable. Default 2s.
	MaxWait time.Duration
	// CacheTTL is how long a positive review is reused, never past the
	// token's own expiry. Default 30s. CacheSize bounds the cache. Default 4096.
	CacheTTL  time.Duration
	CacheSize int
	// MaxInFlight bounds concurrent TokenReviews. Default 16.
	MaxInFlight int
	// NegativeTTL is how long a token the apiserver refused is refused
	// again without asking. Default 10s.
	NegativeTTL time.Duration
	// Keys is where the apiserver's token-signing keys are read from
	// (GET /openid/v1/jwks); nil means Client's REST client. Tokens whose
	// signature they refuse are refused without a TokenReview.
	Keys rest.Interface
	// StaleCacheLimit bounds how long renewal trusts the service-account
	// cache after it last heard from the apiserver; past it renewal is
	// refused as unavailable. Default DefaultStaleCacheLimit.
	StaleCacheLimit time.Duration
}

// DefaultStaleCacheLimit is how long, by default, renewal re-checks
// service accounts against a cache that no longer hears from the
// apiserver: availability through an apiserver outage, against a deleted
// account's workloads renewing for that long.
const DefaultStaleCacheLimit = 5 * time.Minute

// Kubernetes authenticates service-account tokens with TokenReview. Reviews
// are rate-limited and positive results cached briefly, so a flood of bad
// tokens cannot overload the apiserver; local checks (form, audience,
// expiry, and the signature against the apiserver's published keys) refuse
// bad tokens before any review is sent, so that forged tokens cannot use up
// the reviews that real ones need.
type Kubernetes struct {
	cfg      KubernetesConfig
	keys     *issuerKeys
	limiter  *rate.Limiter
	limitMu  sync.Mutex // reservations are made in time order
	inFlight chan struct{}

	mu       sync.Mutex
	cache    map[[sha256.Size]byte]cachedReview
	negative map[[sha256.Size]byte]time.Time

	accounts *accountCache
}

type cachedReview struct {
	caller  ca.Caller
	extra   map[string][]string
	expires time.Time
}

// Review is what a TokenReview said about a token: the caller, and the
// user's extra attributes, where a pod-bound token's pod and node claims
// are ("authentication.kubernetes.io/pod-name", ".../node-name").
type Review struct {
	Caller ca.Caller
	Extra  map[string][]string
}

// Extra keys of a pod-bound service-account token's TokenReview.
const (
	ExtraPodName  = "authentication.kubernetes.io/pod-name"
	ExtraPodUID   = "authentication.kubernetes.io/pod-uid"
	ExtraNodeName = "authentication.kubernetes.io/node-name"
	ExtraNodeUID  = "authentication.kubernetes.io/node-uid"
)

// Value is the single value of an extra attribute, or "" when it has none
// or several.
func (r Review) Value(key string) string {
	if v := r.Extra[key]; len(v) == 1 {
		return v[0]
	}
	return ""
}

// NewKubernetes fills in defaults and returns the authenticator.
func NewKubernetes(cfg KubernetesConfig) (*Kubernetes, error) {
	if cfg.Client == nil {
		return nil, errors.New("authn: a Kubernetes client is required")
	}
	if cfg.TrustDomain.IsZero() {
		return nil, errors.New("authn: a trust domain is required")
	}
	if cfg.Audience == "" {
		cfg.Audience = DefaultAudience
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.QPS <= 0 {
		cfg.QPS = 50
	}
	if cfg.Burst <= 0 {
		cfg.Burst = 100
	}
	if cfg.MaxWait <= 0 {
		cfg.MaxWait = 2 * time.Second
	}
	if cfg.CacheTTL <= 0 {
		cfg.CacheTTL = 30 * time.Second
	}
	if cfg.CacheSize <= 0 {
		cfg.CacheSize = 4096
	}
	if cfg.MaxInFlight <= 0 {
		cfg.MaxInFlight = 16
	}
	if cfg.NegativeTTL <= 0 {
		cfg.NegativeTTL = 10 * time.Second
	}
	if cfg.Keys == nil {
		cfg.Keys = cfg.Client.CoreV1().RESTClient()
	}
	if cfg.StaleCacheLimit < 0 {
		return nil, fmt.Errorf("authn: the stale-cache limit %s is negative", cfg.StaleCacheLimit)
	}
	if cfg.StaleCacheLimit == 0 {
		cfg.StaleCacheLimit = DefaultStaleCacheLimit
	}
	var keys *issuerKeys
	if rc, ok := cfg.Keys.(*rest.RESTClient); !ok || rc != nil { // fake clientsets have none
		keys = newIssuerKeys(cfg.Keys, cfg.Clock)
	}
	return &Kubernetes{
		cfg:      cfg,
		keys:     keys,
		limiter:  rate.NewLimiter(rate.Limit(cfg.QPS), cfg.Burst),
		inFlight: make(chan struct{}, cfg.MaxInFlight),
		cache:    map[[sha256.Size]byte]cachedReview{},
		negative: map[[sha256.Size]byte]time.Time{},
		accounts: newAccountCache(cfg.Client, cfg.Clock),
	}, nil
}

// Run keeps the service-account cache that renewal re-checks against,
// until ctx ends.
func (k *Kubernetes) Run(ctx context.Context) error {
	k.accounts.informer.RunWithContext(ctx)
	return nil
}

// Authenticate checks a service-account token and returns
// spiffe://TD/ns/NS/sa/SA.
func (k *Kubernetes) Authenticate(ctx context.Context, token string) (ca.Caller, error) {
	r, err := k.Review(ctx, token)
	return r.Caller, err
}

// Review checks a service-account token as Authenticate does, and returns
// the review's extra attributes beside the caller.
func (k *Kubernetes) Review(ctx context.Context, token string) (Review, error) {
	c, err := k.review(ctx, token)
	if err != nil {
		return Review{}, err
	}
	return Review{Caller: c.caller, Extra: c.extra}, nil
}

func (k *Kubernetes) review(ctx context.Context, token string) (cachedReview, error) {
	now := k.cfg.Clock.Now()
	claims, err := k.precheck(token, now)
	if err != nil {
		return cachedReview{}, err
	}
	key := sha256.Sum256([]byte(token))
	if c, ok := k.cached(key, now); ok {
		return c, nil
	}
	if k.refusedRecently(key, now) {
		return cachedReview{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenRejected, errors.New("the apiserver refused this token moments ago"))
	}
	if k.keys != nil {
		// Only a signature the published keys refuse is refused here;
		// anything else (no keys to check with) is the review's to decide.
		// Not remembered as refused: the check is cheap, and a genuine
		// token refused while a new key was not yet fetched must not stay
		// refused once it is.
		if err := k.keys.check(ctx, token); errors.Is(err, errBadSignature) {
			return cachedReview{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenSignature, err)
		}
	}
	if err := k.waitForSlot(ctx); err != nil {
		return cachedReview{}, err
	}
	select {
	case k.inFlight <- struct{}{}:
		defer func() { <-k.inFlight }()
	default:
		return cachedReview{}, ca.Refuse(ca.KindUnavailable, ca.ReasonTokenReviewBusy,
			fmt.Errorf("%d TokenReviews already in flight", k.cfg.MaxInFlight))
	}
	review, err := k.cfg.Client.AuthenticationV1().TokenReviews().Create(ctx, &authv1.TokenReview{
		Spec: authv1.TokenReviewSpec{Token: token, Audiences: []string{k.cfg.Audience}},
	}, metav1.CreateOptions{})
	if err != nil {
		return cachedReview{}, ca.Refuse(ca.KindUnavailable, ca.ReasonTokenReviewFailed, fmt.Errorf("TokenReview: %w", err))
	}
	st := review.Status
	if !st.Authenticated {
		k.refuse(key, k.cfg.Clock.Now())
		return cachedReview{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenRejected, fmt.Errorf("TokenReview refused the token: %s", st.Error))
	}
	if !contains(st.Audiences, k.cfg.Audience) {
		return cachedReview{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenAudience,
			fmt.Errorf("TokenReview audiences %v do not include %q", st.Audiences, k.cfg.Audience))
	}
	ns, sa, ok := parseServiceAccountUser(st.User.Username)
	if !ok {
		return cachedReview{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenNotSA,
			fmt.Errorf("token user %q is not a service account", st.User.Username))
	}
	id, err := spiffeid.FromSegments(k.cfg.TrustDomain, "ns", ns, "sa", sa)
	if err != nil {
		return cachedReview{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenNotSA, fmt.Errorf("service account %s/%s: %w", ns, sa, err))
	}
	caller := ca.Caller{
		ID:         id,
		Method:     "kubernetes",
		Subject:    st.User.Username,
		Origin:     journal.OriginKubernetes,
		SubjectUID: st.User.UID,
	}
	expires := now.Add(k.cfg.CacheTTL)
	if !claims.expiry.IsZero() && claims.expiry.Before(expires) {
		expires = claims.expiry
	}
	c := cachedReview{caller: caller, extra: extraOf(st.User.Extra), expires: expires}
	k.store(key, c, now)
	return c, nil
}

func extraOf(in map[string]authv1.ExtraValue) map[string][]string {
	if len(in) == 0 {
		return nil
	}
	out := make(map[string][]string, len(in))
	for k, v := range in {
		out[k] = append([]string(nil), v...)
	}
	return out
}

// waitForSlot takes a TokenReview slot from the rate limiter, on the
// authenticator's clock, waiting at most MaxWait. Reservations are made
// under a lock with the time read inside it, so the limiter always sees
// time move forward and never credits the same interval twice.
func (k *Kubernetes) waitForSlot(ctx context.Context) error {
	k.limitMu.Lock()
	now := k.cfg.Clock.Now()
	r := k.limiter.ReserveN(now, 1)
	if !r.OK() {
		k.limitMu.Unlock()
		return ca.Refuse(ca.KindUnavailable, ca.ReasonTokenReviewBusy, errors.New("TokenReview rate limit"))
	}
	delay := r.DelayFrom(now)
	if delay > k.cfg.MaxWait {
		r.CancelAt(now)
		k.limitMu.Unlock()
		return ca.Refuse(ca.KindUnavailable, ca.ReasonTokenReviewBusy,
			fmt.Errorf("TokenReview rate limit: the next slot is %s away", delay.Round(time.Millisecond)))
	}
	k.limitMu.Unlock()
	if delay > 0 {
		select {
		case <-k.cfg.Clock.After(delay):
		case <-ctx.Done():
			return ca.Refuse(ca.KindUnavailable, ca.ReasonTokenReviewBusy, ctx.Err())
		}
	}
	return nil
}

// CheckServiceAccount refuses a renewal when the service account behind an
// identity no longer exists, or was deleted and created again (uid differs).
// It reads the service-account cache, so that renewal goes on while the
// apiserver is away; a cache that has heard nothing from the apiserver for
// longer than StaleCacheLimit is not trusted, and renewal is refused as
// unavailable until it hears again. An account the cache lacks, or holds
// with another uid, is asked about once more of the apiserver, so that a
// cache a moment behind does not refuse a new account; when the apiserver
// cannot answer, the cache's answer stands.
func (k *Kubernetes) CheckServiceAccount(ctx context.Context, id spiffeid.ID, uid string) error {
	segs := strings.Split(strings.TrimPrefix(id.Path(), "/"), "/")
	if len(segs) != 4 || segs[0] != "ns" || segs[2] != "sa" {
		return ca.Refuse(ca.KindDenied, ca.ReasonCertNotRenewable, fmt.Errorf("%s is not a service-account identity", id))
	}
	ns, name := segs[1], segs[3]
	if !k.accounts.informer.HasSynced() && !k.accounts.waitForSync(ctx, k.cfg.MaxWait) {
		return ca.Refuse(ca.KindUnavailable, ca.ReasonRenewalCheckFailed,
			fmt.Errorf("look up service account %s/%s: the service-account cache has not synced with the apiserver yet", ns, name))
	}
	now := k.cfg.Clock.Now()
	if since, stale := k.accounts.staleSince(); stale && now.Sub(since) > k.cfg.StaleCacheLimit {
		return ca.Refuse(ca.KindUnavailable, ca.ReasonRenewalCheckFailed,
			&StaleCacheError{Since: since, Limit: k.cfg.StaleCacheLimit})
	}
	cachedUID, ok := k.accounts.uid(ns, name)
	if ok && (uid == "" || cachedUID == uid) {
		return nil
	}
	// The cache says no: confirm with the apiserver, bounded in time.
	lctx, cancel := context.WithTimeout(ctx, k.cfg.MaxWait)
	defer cancel()
	sa, err := k.cfg.Client.CoreV1().ServiceAccounts(ns).Get(lctx, name, metav1.GetOptions{})
	switch {
	case err == nil:
		ok, cachedUID = true, string(sa.UID)
	case apierrors.IsNotFound(err):
		ok = false
	}
	if !ok {
		return ca.Refuse(ca.KindDenied, ca.ReasonAccountDeleted, fmt.Errorf("service account %s/%s no longer exists", ns, name))
	}
	if uid != "" && cachedUID != uid {
		return ca.Refuse(ca.KindDenied, ca.ReasonAccountDeleted,
			fmt.Errorf("service account %s/%s was deleted and created again (uid %s, was %s)", ns, name, cachedUID, uid))
	}
	return nil
}

// StaleCacheError says that the service-account cache has not heard from
// the apiserver for longer than the limit.
type StaleCacheError struct {
	Since time.Time
	Limit time.Duration
}

func (e *StaleCacheError) Error() string {
	return fmt.Sprintf("the service-account cache is stale: nothing heard from the kube-apiserver since %s (limit %s)",
		e.Since.UTC().Format(time.RFC3339), e.Limit)
}

// accountCache is an informer's cache of every service account, for the
// renewal re-check, and a measure of how fresh it is. Client-go's reflector
// does not say when it last heard from the apiserver, so the list and watch
// calls it makes are observed: the cache is fresh while a watch is open
// (client-go's HTTP/2 health check closes a watch whose connection has gone
// silent, in about 45 s), and otherwise stale since the apiserver last
// answered (a list, a watch opened, an event or bookmark, or a watch's end).
type accountCache struct {
	informer cache.SharedIndexInformer
	clock    clock.PassiveClock

	mu      sync.Mutex
	watches int       // open watches
	heard   time.Time // when the apiserver last answered
}

func newAccountCache(client kubernetes.Interface, clk clock.PassiveClock) *accountCache {
	a := &accountCache{clock: clk}
	sas := func() typedcorev1.ServiceAccountInterface {
		return client.CoreV1().ServiceAccounts(metav1.NamespaceAll)
	}
	lw := cache.ToListWatcherWithWatchListSemantics(&cache.ListWatch{
		ListWithContextFunc: func(ctx context.Context, o metav1.ListOptions) (runtime.Object, error) {
			list, err := sas().List(ctx, o)
			if err == nil {
				a.answered()
			}
			return list, err
		},
		WatchFuncWithContext: func(ctx context.Context, o metav1.ListOptions) (watch.Interface, error) {
			w, err := sas().Watch(ctx, o)
			if err != nil {
				return nil, err
			}
			return a.observe(w), nil
		},
	}, client)
	a.informer = cache.NewSharedIndexInformerWithOptions(lw, &corev1.ServiceAccount{}, cache.SharedIndexInformerOptions{})
	// Only the name and uid are read: the rest is not kept.
	_ = a.informer.SetTransform(func(obj any) (any, error) {
		sa, ok := obj.(*corev1.ServiceAccount)
		if !ok {
			return obj, nil
		}
		return &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{
			Name: sa.Name, Namespace: sa.Namespace, UID: sa.UID, ResourceVersion: sa.ResourceVersion,
		}}, nil
	})
	return a
}

// waitForSync waits at most d for the cache's first sync, as a renewal
// that comes just after start-up does.
func (a *accountCache) waitForSync(ctx context.Context, d time.Duration) bool {
	ctx, cancel := context.WithTimeout(ctx, d)
	defer cancel()
	return cache.WaitForCacheSync(ctx.Done(), a.informer.HasSynced)
}

func (a *accountCache) uid(ns, name string) (string, bool) {
	obj, ok, err := a.informer.GetIndexer().GetByKey(ns + "/" + name)
	if err != nil || !ok {
		return "", false
	}
	sa, ok := obj.(*corev1.ServiceAccount)
	if !ok {
		return "", false
	}
	return string(sa.UID), true
}

// staleSince reports whether no watch is open, and since when the
// apiserver has not answered.
func (a *accountCache) staleSince() (time.Time, bool) {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.heard, a.watches == 0
}

func (a *accountCache) answered() {
	now := a.clock.Now()
	a.mu.Lock()
	a.heard = now
	a.mu.Unlock()
}

// observe counts w as open until its stream ends, and every event on it,
// except an error, as the apiserver answering.
func (a *accountCache) observe(w watch.Interface) watch.Interface {
	now := a.clock.Now()
	a.mu.Lock()
	a.watches++
	a.heard = now
	a.mu.Unlock()
	o := &observedWatch{inner: w, out: make(chan watch.Event), done: make(chan struct{})}
	go func() {
		defer close(o.out)
		defer func() {
			now := a.clock.Now()
			a.mu.Lock()
			a.watches--
			a.heard = now
			a.mu.Unlock()
		}()
		for ev := range w.ResultChan() {
			if ev.Type != watch.Error {
				a.answered()
			}
			select {
			case o.out <- ev:
			case <-o.done:
				return
			}
		}
	}()
	return o
}

type observedWatch struct {
	inner watch.Interface
	out   chan watch.Event
	done  chan struct{}
	once  sync.Once
}

func (o *observedWatch) Stop() {
	o.once.Do(func() { close(o.done) })
	o.inner.Stop()
}

func (o *observedWatch) ResultChan() <-chan watch.Event { return o.out }

type jwtClaims struct {
	expiry time.Time
}

// precheck refuses tokens that cannot pass a TokenReview, without asking the
// apiserver. It trusts nothing it reads: a token that passes is still
// reviewed.
func (k *Kubernetes) precheck(token string, now time.Time) (jwtClaims, error) {
	malformed := func(why string) error {
		return ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenMalformed, errors.New(why))
	}
	if len(token) > maxJWTSize {
		return jwtClaims{}, malformed("token is too large")
	}
	parts := strings.Split(token, ".")
	if len(parts) != 3 || parts[0] == "" || parts[1] == "" || parts[2] == "" {
		return jwtClaims{}, malformed("token is not a JWT")
	}
	// Only the canonical compact form: base64url without padding,
	// whitespace or stray bits. Decoders forgive all three, and each
	// forgiven variant of one real token would be a new token to the
	// caches, and a new TokenReview.
	var payload []byte
	for i, p := range parts {
		if strings.TrimLeft(p, base64URLAlphabet) != "" {
			return jwtClaims{}, malformed("token is not in canonical compact form")
		}
		b, err := base64.RawURLEncoding.Strict().DecodeString(p)
		if err != nil {
			return jwtClaims{}, malformed("token is not in canonical compact form")
		}
		if i == 1 {
			payload = b
		}
	}
	var claims struct {
		Aud audience `json:"aud"`
		Exp *float64 `json:"exp"`
	}
	if err := json.Unmarshal(payload, &claims); err != nil {
		return jwtClaims{}, malformed("token payload is not a JSON claims set")
	}
	if !contains(claims.Aud, k.cfg.Audience) {
		return jwtClaims{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenAudience,
			fmt.Errorf("token audiences %v do not include %q", []string(claims.Aud), k.cfg.Audience))
	}
	var out jwtClaims
	if claims.Exp != nil {
		out.expiry = time.Unix(int64(*claims.Exp), 0)
		if !now.Before(out.expiry) {
			return jwtClaims{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonTokenExpired,
				fmt.Errorf("token expired at %s", out.expiry.UTC().Format(time.RFC3339)))
		}
	}
	return out, nil
}

func (k *Kubernetes) cached(key [sha256.Size]byte, now time.Time) (cachedReview, bool) {
	k.mu.Lock()
	defer k.mu.Unlock()
	c, ok := k.cache[key]
	if !ok {
		return cachedReview{}, false
	}
	if !now.Before(c.expires) {
		delete(k.cache, key)
		return cachedReview{}, false
	}
	return c, true
}

func (k *Kubernetes) refusedRecently(key [sha256.Size]byte, now time.Time) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	until, ok := k.negative[key]
	if ok && !now.Before(until) {
		delete(k.negative, key)
		return false
	}
	return ok
}

func (k *Kubernetes) refuse(key [sha256.Size]byte, now time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.negative) >= k.cfg.CacheSize {
		for kk, until := range k.negative {
			if !now.Before(until) {
				delete(k.negative, kk)
			}
		}
		if len(k.negative) >= k.cfg.CacheSize {
			return
		}
	}
	k.negative[key] = now.Add(k.cfg.NegativeTTL)
}

func (k *Kubernetes) store(key [sha256.Size]byte, c cachedReview, now time.Time) {
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.cache) >= k.cfg.CacheSize {
		for kk, v := range k.cache {
			if !now.Before(v.expires) {
				delete(k.cache, kk)
			}
		}
		if len(k.cache) >= k.cfg.CacheSize {
			return // full of live entries: skip caching rather than grow
		}
	}
	k.cache[key] = c
}

// audience is a JWT "aud" claim, a string or an array of strings.
type audience []string

func (a *audience) UnmarshalJSON(b []byte) error {
	var one string
	if err := json.Unmarshal(b, &one); err == nil {
		*a = []string{one}
		return nil
	}
	var many []string
	if err := json.Unmarshal(b, &many); err != nil {
		return err
	}
	*a = many
	return nil
}

func parseServiceAccountUser(u string) (ns, sa string, ok bool) {
	const prefix = "system:serviceaccount:"
	if !strings.HasPrefix(u, prefix) {
		return "", "", false
	}
	parts := strings.Split(strings.TrimPrefix(u, prefix), ":")
	if len(parts) != 2 || parts[0] == "" || parts[1] == "" {
		return "", "", false
	}
	return parts[0], parts[1], true
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}
