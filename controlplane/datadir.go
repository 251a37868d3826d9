package controlplane

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"go.step.sm/crypto/pemutil"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// The layout of a data directory.
const (
	caSubdir        = "ca"
	journalFile     = "journal.db"
	metaTrustDomain = "trust_domain"
)

// DataDir is a trustmesh data directory.
type DataDir string

// CADir holds self-managed CA material.
func (d DataDir) CADir() string { return filepath.Join(string(d), caSubdir) }

// JournalPath is the embedded journal database.
func (d DataDir) JournalPath() string { return filepath.Join(string(d), journalFile) }

// openJournal opens the journal and binds it to a trust domain: the first
// start records the trust domain, and every later use must agree with it.
// An empty td accepts the recorded one.
func (d DataDir) openJournal(ctx context.Context, td string) (*journal.Store, spiffeid.TrustDomain, error) {
	store, err := journal.OpenSQLite(ctx, d.JournalPath())
	if err != nil {
		return nil, spiffeid.TrustDomain{}, err
	}
	var stored string
	if td == "" {
		stored, err = store.Meta(ctx, metaTrustDomain)
		if errors.Is(err, journal.ErrNotFound) {
			err = fmt.Errorf("controlplane: %s has no trust domain yet; start trustmesh serve on it first or name one", d)
		}
	} else {
		stored, err = store.SetMetaOnce(ctx, metaTrustDomain, td)
		if err == nil && stored != td {
			err = fmt.Errorf("controlplane: %s belongs to trust domain %q, not %q", d, stored, td)
		}
	}
	if err != nil {
		store.Close()
		return nil, spiffeid.TrustDomain{}, err
	}
	parsed, err := spiffeid.TrustDomainFromString(stored)
	if err != nil {
		store.Close()
		return nil, spiffeid.TrustDomain{}, fmt.Errorf("controlplane: trust domain %q: %w", stored, err)
	}
	return store, parsed, nil
}

// CreateJoinToken makes a one-time join token for id in the data directory's
// CA, records its creation, and returns the token.
func CreateJoinToken(ctx context.Context, dir DataDir, id string, ttl time.Duration) (string, error) {
	store, td, err := dir.openJournal(ctx, "")
	if err != nil {
		return "", err
	}
	defer store.Close()
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return "", fmt.Errorf("controlplane: SPIFFE ID %q: %w", id, err)
	}
	jt := &authn.JoinTokens{TrustDomain: td, Store: store, Clock: clock.RealClock{}}
	tok, _, err := jt.Create(ctx, sid, ttl)
	return tok, err
}

// Revoke revokes every enrolment of id and its unused join tokens, so the
// identity can no longer renew.
func Revoke(ctx context.Context, dir DataDir, id string) (journal.Revocation, error) {
	store, td, err := dir.openJournal(ctx, "")
	if err != nil {
		return journal.Revocation{}, err
	}
	defer store.Close()
	sid, err := spiffeid.FromString(id)
	if err != nil {
		return journal.Revocation{}, fmt.Errorf("controlplane: SPIFFE ID %q: %w", id, err)
	}
	if sid.TrustDomain() != td {
		return journal.Revocation{}, fmt.Errorf("controlplane: %s is not in trust domain %s", sid, td)
	}
	return store.Revoke(ctx, sid.String(), time.Now())
}

// TrustBundle reads the trust bundle of the data directory's CA, or of
// operator-supplied material in cacertsDir.
func TrustBundle(ctx context.Context, dir DataDir, cacertsDir string) (*spiffebundle.Bundle, error) {
	store, td, err := dir.openJournal(ctx, "")
	if err != nil {
		return nil, err
	}
	store.Close()
	src := dir.CADir()
	if cacertsDir != "" {
		src = cacertsDir
	}
	roots, err := pemutil.ReadCertificateBundle(filepath.Join(src, authority.RootCertFile))
	if err != nil {
		return nil, fmt.Errorf("controlplane: read trust bundle: %w", err)
	}
	return spiffebundle.FromX509Authorities(td, roots), nil
}
