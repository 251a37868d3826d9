package admin

import (
	"context"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// CreateJoinToken makes a one-time join token for id in the data directory's
// CA, records its creation, and returns the token.
func CreateJoinToken(ctx context.Context, dir DataDir, o JournalOptions, id string, ttl time.Duration) (string, error) {
	store, td, err := dir.OpenJournal(ctx, "", o, false)
	if err != nil {
		return "", err
	}
	defer store.Close()
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return "", fmt.Errorf("admin: SPIFFE ID %q: %w", id, err)
	}
	jt := &authn.JoinTokens{TrustDomain: td, Store: store, Clock: clock.RealClock{}}
	tok, _, err := jt.Create(ctx, sid, ttl)
	return tok, err
}

// Revoke revokes every enrolment of id and its unused join tokens, so the
// identity can no longer renew.
func Revoke(ctx context.Context, dir DataDir, o JournalOptions, id string) (journal.Revocation, error) {
	store, td, err := dir.OpenJournal(ctx, "", o, false)
	if err != nil {
		return journal.Revocation{}, err
	}
	defer store.Close()
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return journal.Revocation{}, fmt.Errorf("admin: SPIFFE ID %q: %w", id, err)
	}
	if sid.TrustDomain() != td {
		return journal.Revocation{}, fmt.Errorf("admin: %s is not in trust domain %s", sid, td)
	}
	return store.Revoke(ctx, sid.String(), time.Now())
}
