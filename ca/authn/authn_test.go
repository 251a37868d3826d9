package authn

import (
	"context"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// noTokens is a journal that created no join token.
type noTokens struct{}

func (noTokens) CreateJoinToken(context.Context, []byte, journal.JoinToken) error { return nil }
func (noTokens) LookupJoinToken(context.Context, []byte) (journal.JoinToken, error) {
	return journal.JoinToken{}, journal.ErrNotFound
}
func (noTokens) LookupJoinTokenCreation(context.Context, string) (journal.JoinTokenCreated, error) {
	return journal.JoinTokenCreated{}, journal.ErrNotFound
}

// TestBearerTokenRefusalReasons: off Kubernetes, a bearer token that is not
// a JWT is a mangled join token, and is counted as malformed, not as
// kubernetes-not-configured; a join token with characters base64url has
// not is malformed without a lookup.
func TestBearerTokenRefusalReasons(t *testing.T) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	a := &Authenticator{TrustDomain: td, JoinTokens: &JoinTokens{TrustDomain: td, Store: noTokens{}}}
	for _, tc := range []struct{ name, token, reason string }{
		{"prefix cut short", "tmj", ca.ReasonJoinTokenMalformed},
		{"prefix lost", "Zm9vYmFy", ca.ReasonJoinTokenMalformed},
		{"nothing after the prefix", "tmjt.", ca.ReasonJoinTokenMalformed},
		{"quoted", `"tmjt.AAAA"`, ca.ReasonJoinTokenMalformed},
		{"not base64url", "tmjt.AA+A/A==", ca.ReasonJoinTokenMalformed},
		{"oversized", "tmjt." + strings.Repeat("A", 300), ca.ReasonJoinTokenMalformed},
		{"well-formed, never created", "tmjt.AAAA", ca.ReasonJoinTokenUnknown},
		{"a JWT", "eyJhbGciOiJSUzI1NiJ9.e30.c2ln", ca.ReasonKubernetesOff},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := a.Authenticate(context.Background(), Credentials{BearerToken: tc.token})
			r, ok := ca.AsRefusal(err)
			if !ok || r.Reason != tc.reason || r.Kind != ca.KindUnauthenticated {
				t.Fatalf("Authenticate(%q) = %v; want an unauthenticated refusal %q", tc.token, err, tc.reason)
			}
		})
	}
}
