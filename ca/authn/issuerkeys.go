package authn

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"sync"
	"sync/atomic"
	"time"

	"github.com/go-jose/go-jose/v4"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"
)

// jwksPath is where the apiserver publishes the keys that verify the
// service-account tokens it issues (service account issuer discovery).
const jwksPath = "/openid/v1/jwks"

// maxJWKSSize bounds the key set read from the apiserver.
const maxJWKSSize = 1 << 20

// tokenAlgorithms are the signature algorithms the apiserver signs
// service-account tokens with. No HMAC, no "none".
var tokenAlgorithms = []jose.SignatureAlgorithm{jose.RS256, jose.RS384, jose.RS512, jose.ES256, jose.ES384, jose.ES512, jose.PS256, jose.PS384, jose.PS512}

var (
	// errNoKeys: the apiserver's keys are not known, so the signature
	// cannot be checked here; the token goes to TokenReview as it is.
	errNoKeys = errors.New("the apiserver's token keys are unavailable")
	// errBadSignature: the token names a key the apiserver does not
	// publish, or does not verify with the one it names.
	errBadSignature = errors.New("the token's signature does not verify with the apiserver's published keys")
)

// issuerKeys checks service-account token signatures against the keys the
// apiserver publishes, so that a forged token is refused here instead of
// costing a TokenReview. It only ever refuses: a token it passes is still
// reviewed (its pod may be gone, its service account deleted), and while
// the keys cannot be read every token is reviewed, as without it.
type issuerKeys struct {
	client rest.Interface
	clock  clock.PassiveClock
	// refetchAfter is how soon the keys may be fetched again for a token
	// that names a key not among them: the apiserver may have a new key,
	// but a flood of made-up key IDs must not become a flood of fetches.
	refetchAfter time.Duration

	// state is read without a lock: a token under a known key never waits
	// for a fetch. fetchMu makes the callers that need a fetch share one.
	state   atomic.Pointer[keyState]
	fetchMu sync.Mutex
}

// keyState is what the last fetch left: the keys (the last good ones when
// it failed), whether it failed, and when it was made.
type keyState struct {
	keys   *jose.JSONWebKeySet
	failed bool
	at     time.Time
}

func newIssuerKeys(client rest.Interface, clk clock.PassiveClock) *issuerKeys {
	return &issuerKeys{client: client, clock: clk, refetchAfter: 30 * time.Second}
}

// check verifies a compact JWS token's signature. It returns errNoKeys
// when the keys are unavailable, and wraps errBadSignature for a token
// they refuse.
func (k *issuerKeys) check(ctx context.Context, token string) error {
	jws, err := jose.ParseSignedCompact(token, tokenAlgorithms)
	if err != nil {
		return fmt.Errorf("%w: %v", errBadSignature, err)
	}
	if len(jws.Signatures) != 1 {
		return fmt.Errorf("%w: %d signatures", errBadSignature, len(jws.Signatures))
	}
	kid := jws.Signatures[0].Header.KeyID
	keys, err := k.lookup(ctx, kid)
	if err != nil {
		return err
	}
	if len(keys) == 0 {
		return fmt.Errorf("%w: no published key has ID %q", errBadSignature, kid)
	}
	for _, key := range keys {
		if _, err := jws.Verify(key.Key); err == nil {
			return nil
		}
	}
	return errBadSignature
}

// lookup returns the published keys with the ID (all of them for a token
// that names none). It fetches the keys when there are none yet or, at
// most once per refetchAfter, when the ID is unknown; when a fetch fails
// it answers errNoKeys, so that the token is reviewed rather than refused
// for want of a key.
func (k *issuerKeys) lookup(ctx context.Context, kid string) ([]jose.JSONWebKey, error) {
	answer := func(st *keyState) ([]jose.JSONWebKey, bool, error) {
		if st == nil {
			return nil, false, nil
		}
		fresh := k.clock.Since(st.at) < k.refetchAfter
		if st.keys == nil {
			return nil, fresh, errNoKeys
		}
		found := st.keys.Keys
		if kid != "" {
			found = st.keys.Key(kid)
		}
		if len(found) == 0 && st.failed {
			// The key may be new; the keys could not be read to know.
			return nil, fresh, errNoKeys
		}
		return found, len(found) > 0 || fresh, nil
	}
	if found, ok, err := answer(k.state.Load()); ok {
		return found, err
	}
	k.fetchMu.Lock()
	defer k.fetchMu.Unlock()
	// Another caller may have fetched while this one waited.
	if found, ok, err := answer(k.state.Load()); ok {
		return found, err
	}
	// The fetch serves every caller, so it does not end with this one's
	// request.
	st := &keyState{at: k.clock.Now()}
	if keys, err := k.fetch(context.WithoutCancel(ctx)); err == nil {
		st.keys = keys
	} else {
		st.failed = true
		if prev := k.state.Load(); prev != nil {
			st.keys = prev.keys
		}
	}
	k.state.Store(st)
	found, _, err := answer(st)
	return found, err
}

// fetch reads the key set. A set with no key is an error: it would refuse
// every token.
func (k *issuerKeys) fetch(ctx context.Context) (*jose.JSONWebKeySet, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	body, err := k.client.Get().AbsPath(jwksPath).Stream(ctx)
	if err != nil {
		return nil, fmt.Errorf("authn: GET %s: %w", jwksPath, err)
	}
	defer body.Close()
	raw, err := io.ReadAll(io.LimitReader(body, maxJWKSSize+1))
	if err != nil {
		return nil, fmt.Errorf("authn: GET %s: %w", jwksPath, err)
	}
	if len(raw) > maxJWKSSize {
		return nil, fmt.Errorf("authn: %s is larger than %d bytes", jwksPath, maxJWKSSize)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(raw, &set); err != nil {
		return nil, fmt.Errorf("authn: %s: %w", jwksPath, err)
	}
	if len(set.Keys) == 0 {
		return nil, fmt.Errorf("authn: %s publishes no key", jwksPath)
	}
	for _, key := range set.Keys {
		if !key.IsPublic() || !key.Valid() {
			return nil, fmt.Errorf("authn: %s holds a key (%q) that is not a valid public key", jwksPath, key.KeyID)
		}
	}
	return &set, nil
}
