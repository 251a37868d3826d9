package authn

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"errors"
	"fmt"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// joinTokenPrefix marks trustmesh join tokens, so they are told apart from
// Kubernetes JWTs without a lookup.
const joinTokenPrefix = "tmjt."

// MaxJoinTokenTTL bounds how long a join token may wait to be used.
const MaxJoinTokenTTL = 7 * 24 * time.Hour

// IsJoinToken reports whether a bearer token has the join-token form.
func IsJoinToken(tok string) bool { return strings.HasPrefix(tok, joinTokenPrefix) }

// JoinTokenStore is the storage join tokens need.
type JoinTokenStore interface {
	CreateJoinToken(ctx context.Context, hash []byte, tok journal.JoinToken) error
	LookupJoinToken(ctx context.Context, hash []byte) (journal.JoinToken, error)
	LookupJoinTokenCreation(ctx context.Context, tokenID string) (journal.JoinTokenCreated, error)
}

// JoinTokens creates and checks one-time join tokens. Only a token's SHA-256
// is stored. A token is spent in the same transaction that records the
// certificate issued for it, so it works exactly once.
type JoinTokens struct {
	TrustDomain spiffeid.TrustDomain
	Store       JoinTokenStore
	Clock       clock.PassiveClock
}

// Create makes a token bound to id, valid for ttl, records its creation, and
// returns the token and its id.
func (j *JoinTokens) Create(ctx context.Context, id spiffeid.ID, ttl time.Duration) (token, tokenID string, err error) {
	if id.TrustDomain() != j.TrustDomain {
		return "", "", fmt.Errorf("authn: %s is not in the CA's trust domain %s", id, j.TrustDomain)
	}
	if id.Path() == "" {
		return "", "", fmt.Errorf("authn: %s names the trust domain itself, not a workload", id)
	}
	if ttl <= 0 || ttl > MaxJoinTokenTTL {
		return "", "", fmt.Errorf("authn: join token TTL %s must be positive and at most %s", ttl, MaxJoinTokenTTL)
	}
	secret := make([]byte, 32)
	if _, err := rand.Read(secret); err != nil {
		return "", "", fmt.Errorf("authn: %w", err)
	}
	token = joinTokenPrefix + base64.RawURLEncoding.EncodeToString(secret)
	hash := hashToken(token)
	tokenID = tokenIDOf(hash)
	now := j.Clock.Now()
	if err := j.Store.CreateJoinToken(ctx, hash, journal.JoinToken{
		ID: tokenID, SPIFFEID: id.String(), CreatedAt: now, ExpiresAt: now.Add(ttl),
	}); err != nil {
		return "", "", fmt.Errorf("authn: %w", err)
	}
	return token, tokenID, nil
}

// Authenticate checks a join token. It does not spend it: the issuance does,
// atomically with its record, through the returned caller's Redeem.
//
// The token's state comes from the journal's ledger, proven against the
// signed log; no table beside the log can vouch for a token.
func (j *JoinTokens) Authenticate(ctx context.Context, token string) (ca.Caller, error) {
	if why := malformedJoinToken(token); why != "" {
		return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonJoinTokenMalformed, errors.New(why))
	}
	hash := hashToken(token)
	tok, err := j.Store.LookupJoinToken(ctx, hash)
	if errors.Is(err, journal.ErrNotFound) {
		// The signed log created no such token. A row that claims to have
		// is a rewrite of the database: proving it fails the journal
		// closed, and the caller learns only that it failed.
		if _, cerr := j.Store.LookupJoinTokenCreation(ctx, tokenIDOf(hash)); cerr != nil && !errors.Is(cerr, journal.ErrNotFound) {
			return ca.Caller{}, ca.Refuse(ca.KindUnavailable, ca.ReasonRenewalCheckFailed, cerr)
		}
		return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonJoinTokenUnknown, errors.New("unknown join token"))
	}
	if err != nil {
		return ca.Caller{}, ca.Refuse(ca.KindUnavailable, ca.ReasonRenewalCheckFailed, err)
	}
	now := j.Clock.Now()
	switch {
	case !tok.UsedAt.IsZero():
		return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonJoinTokenUsed,
			fmt.Errorf("join token %s was used at %s", tok.ID, tok.UsedAt.Format(time.RFC3339)))
	case !tok.RevokedAt.IsZero():
		return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonJoinTokenRevoked, fmt.Errorf("join token %s was revoked", tok.ID))
	case !now.Before(tok.ExpiresAt):
		return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonJoinTokenExpired,
			fmt.Errorf("join token %s expired at %s", tok.ID, tok.ExpiresAt.Format(time.RFC3339)))
	}
	id, err := spiffeid.FromString(tok.SPIFFEID)
	if err != nil {
		return ca.Caller{}, ca.Refuse(ca.KindInternal, ca.ReasonJoinTokenUnknown, fmt.Errorf("stored join token %s: %w", tok.ID, err))
	}
	return ca.Caller{
		ID:          id,
		Method:      "join-token",
		Subject:     "join-token:" + tok.ID,
		Origin:      journal.OriginJoinToken,
		EnrolmentID: tok.ID,
		Redeem:      &journal.Redemption{TokenHash: hash, TokenID: tok.ID},
	}, nil
}

// maxJoinTokenSize bounds what is hashed and looked up; a real token is 48
// bytes.
const maxJoinTokenSize = 256

// malformedJoinToken says why token cannot be a join token, or "" when it
// has the form of one: the prefix, then base64url. Whether it exists is for
// the journal to say.
func malformedJoinToken(token string) string {
	body, ok := strings.CutPrefix(token, joinTokenPrefix)
	switch {
	case !ok:
		return "not a join token"
	case len(token) > maxJoinTokenSize:
		return "join token is too large"
	case body == "":
		return "join token is empty after its prefix"
	case strings.Trim(body, base64URLAlphabet) != "":
		return "join token has characters outside base64url"
	}
	return ""
}

// tokenIDOf names a token by the first 8 bytes of its hash.
func tokenIDOf(hash []byte) string { return hex.EncodeToString(hash[:8]) }

func hashToken(tok string) []byte {
	h := sha256.Sum256([]byte(tok))
	return h[:]
}
