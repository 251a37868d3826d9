package authn

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/go-jose/go-jose/v4"
	"k8s.io/client-go/rest"
	"k8s.io/utils/clock"
)

// jwksPath is where the apiserver publishes the keys that verify the
// service-account tokens it issues (service account issuer discovery).
const jwksPath = "/openid/v1/jwks"

// tokenAlgorithms are the signature algorithms the apiserver signs
// service-account tokens with.
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
// the keys cannot be fetched every token is reviewed, as without it.
type issuerKeys struct {
	client rest.Interface
	clock  clock.PassiveClock
	// refetchAfter is how soon the keys may be fetched again for a token
	// that names a key not among them: the apiserver may have a new key,
	// but a flood of made-up key IDs must not become a flood of fetches.
	refetchAfter time.Duration

	mu      sync.Mutex
	keys    *jose.JSONWebKeySet
	fetched time.Time
	tried   bool
}

func newIssuerKeys(client rest.Interface, clk clock.PassiveClock) *issuerKeys {
	return &issuerKeys{client: client, clock: clk, refetchAfter: 30 * time.Second}
}

// check verifies the token's signature. It returns errNoKeys when the keys
// are unavailable, errBadSignature (wrapped) for a token they refuse.
func (k *issuerKeys) check(ctx context.Context, token string) error {
	jws, err := jose.ParseSigned(token, tokenAlgorithms)
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
// that names none), fetching the keys when there are none yet or, at most
// once per refetchAfter, when the ID is unknown.
func (k *issuerKeys) lookup(ctx context.Context, kid string) ([]jose.JSONWebKey, error) {
	k.mu.Lock()
	defer k.mu.Unlock()
	find := func() []jose.JSONWebKey {
		if kid == "" {
			return k.keys.Keys
		}
		return k.keys.Key(kid)
	}
	if k.keys != nil {
		if found := find(); len(found) > 0 || k.clock.Since(k.fetched) < k.refetchAfter {
			return found, nil
		}
	} else if k.tried && k.clock.Since(k.fetched) < k.refetchAfter {
		return nil, errNoKeys
	}
	// Fetching under the lock: concurrent callers wait for one fetch
	// rather than each making their own.
	keys, err := k.fetch(ctx)
	k.tried, k.fetched = true, k.clock.Now()
	if err != nil {
		if k.keys == nil {
			return nil, fmt.Errorf("%w: %v", errNoKeys, err)
		}
		// Keep the keys we had; the unknown ID stays unknown.
		return nil, nil
	}
	k.keys = keys
	return find(), nil
}

func (k *issuerKeys) fetch(ctx context.Context) (*jose.JSONWebKeySet, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	body, err := k.client.Get().AbsPath(jwksPath).DoRaw(ctx)
	if err != nil {
		return nil, fmt.Errorf("authn: GET %s: %w", jwksPath, err)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("authn: %s: %w", jwksPath, err)
	}
	for _, key := range set.Keys {
		if !key.IsPublic() || !key.Valid() {
			return nil, fmt.Errorf("authn: %s holds a key (%q) that is not a valid public key", jwksPath, key.KeyID)
		}
	}
	return &set, nil
}
