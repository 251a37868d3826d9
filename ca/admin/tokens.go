package admin

import (
	"context"
	"errors"
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
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return "", fmt.Errorf("admin: SPIFFE ID %q: %w", id, err)
	}
	store, td, err := dir.openExisting(ctx, o, false)
	if err != nil {
		return "", err
	}
	defer store.Close()
	jt := &authn.JoinTokens{TrustDomain: td, Store: store, Clock: clock.RealClock{}}
	tok, _, err := jt.Create(ctx, sid, ttl)
	return tok, err
}

// CreateNodeJoinToken makes a one-time join token for the node agent of the
// node name: its identity is spiffe://TD/node/NAME in the data directory's
// trust domain. name must be a valid node name (a DNS-1123 subdomain).
func CreateNodeJoinToken(ctx context.Context, dir DataDir, o JournalOptions, name string, ttl time.Duration) (string, error) {
	store, td, err := dir.openExisting(ctx, o, false)
	if err != nil {
		return "", err
	}
	defer store.Close()
	id, err := spiffeid.FromSegments(td, "node", name)
	if err == nil {
		_, err = authn.NodeNameOf(td, id)
	}
	if err != nil {
		return "", fmt.Errorf("admin: node name %q: %w", name, err)
	}
	jt := &authn.JoinTokens{TrustDomain: td, Store: store, Clock: clock.RealClock{}}
	tok, _, err := jt.Create(ctx, id, ttl)
	return tok, err
}

// Revoke revokes every enrolment of id and its unused join tokens, so the
// identity can no longer renew. When id has neither, it fails with
// journal.ErrNothingToRevoke and writes nothing.
func Revoke(ctx context.Context, dir DataDir, o JournalOptions, id string) (journal.Revocation, error) {
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return journal.Revocation{}, fmt.Errorf("admin: SPIFFE ID %q: %w", id, err)
	}
	store, td, err := dir.openExisting(ctx, o, false)
	if err != nil {
		return journal.Revocation{}, err
	}
	defer store.Close()
	if sid.TrustDomain() != td {
		return journal.Revocation{}, fmt.Errorf("admin: %s is not in trust domain %s", sid, td)
	}
	rev, err := store.RevokeStanding(ctx, sid.String(), time.Now())
	if errors.Is(err, journal.ErrNothingToRevoke) {
		return journal.Revocation{}, fmt.Errorf("admin: %s has no standing enrolment or unused join token; nothing was written (%w)", sid, journal.ErrNothingToRevoke)
	}
	return rev, err
}
