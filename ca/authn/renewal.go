package authn

import (
	"context"
	"crypto/sha256"
	"crypto/x509"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// DefaultMaxEnrolmentAge bounds how long a join-token enrolment may be
// renewed without enrolling again.
const DefaultMaxEnrolmentAge = 30 * 24 * time.Hour

// RenewalStore is what renewal checks read from the journal.
type RenewalStore interface {
	LookupIssuance(ctx context.Context, serial string) (journal.Issuance, error)
	LookupEnrolment(ctx context.Context, id string) (journal.Enrolment, error)
}

// Renewal authenticates a caller by its current trustmesh certificate, for a
// certificate of the same identity only. It re-checks that the identity still
// stands with the authority it first came from, so a stolen key cannot renew
// forever: a Kubernetes identity needs its service account, a join-token
// identity an unrevoked enrolment younger than MaxEnrolmentAge.
type Renewal struct {
	TrustDomain spiffeid.TrustDomain
	Bundle      x509bundle.Source
	Store       RenewalStore
	// Kubernetes checks service accounts; nil off Kubernetes, in which case
	// Kubernetes identities cannot renew.
	Kubernetes      *Kubernetes
	MaxEnrolmentAge time.Duration
	Clock           clock.PassiveClock

	// verified remembers client chains that verified, so that the chain of
	// a kept connection, the same on every call, costs its signature
	// checks once rather than on each renewal.
	verified chainCache
}

// Authenticate verifies the client chain against the current bundle and
// returns the identity it names.
func (r *Renewal) Authenticate(ctx context.Context, chain []*x509.Certificate) (ca.Caller, error) {
	now := r.Clock.Now()
	id, key, err := r.verifyChain(chain, now)
	if err != nil {
		return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonCertInvalid, fmt.Errorf("client certificate: %w", err))
	}
	if id.TrustDomain() != r.TrustDomain {
		return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonCertInvalid, fmt.Errorf("client certificate is for trust domain %s", id.TrustDomain()))
	}
	serial := ca.SerialHex(chain[0])
	iss, err := r.recordedIssuance(ctx, key, chain[0], id)
	if err != nil {
		return ca.Caller{}, err
	}
	// What follows reads the journal and the Kubernetes API on every call:
	// an enrolment revoked or a service account deleted, by this replica or
	// another, refuses the next renewal.
	switch iss.Origin {
	case journal.OriginKubernetes:
		if r.Kubernetes == nil {
			return ca.Caller{}, ca.Refuse(ca.KindDenied, ca.ReasonRenewalCheckFailed,
				errors.New("a Kubernetes identity cannot renew while Kubernetes authentication is off"))
		}
		if err := r.Kubernetes.CheckServiceAccount(ctx, id, iss.SubjectUID); err != nil {
			return ca.Caller{}, err
		}
	case journal.OriginJoinToken:
		if err := r.checkEnrolment(ctx, iss.EnrolmentID, id, now); err != nil {
			return ca.Caller{}, err
		}
	default:
		return ca.Caller{}, ca.Refuse(ca.KindDenied, ca.ReasonCertNotRenewable,
			fmt.Errorf("certificate %s of origin %q cannot be renewed by a client", serial, iss.Origin))
	}
	return ca.Caller{
		ID:          id,
		Method:      "x509-renewal",
		Subject:     "x509:" + serial,
		Origin:      iss.Origin,
		EnrolmentID: iss.EnrolmentID,
		SubjectUID:  iss.SubjectUID,
	}, nil
}

// recordedIssuance returns the journal's record of the client certificate
// leaf, after checking that it names id and is that certificate byte for
// byte. A record that passed is remembered with the verified chain (key):
// the journal only appends, and an issuance is never rewritten or revoked
// by itself (revocation is of an identity's enrolments, checked on every
// call), so the record of one certificate's bytes cannot change. A journal
// found tampered with fails closed on its own: the CA then signs nothing.
func (r *Renewal) recordedIssuance(ctx context.Context, key [sha256.Size]byte, leaf *x509.Certificate, id spiffeid.ID) (journal.Issuance, error) {
	if iss, ok := r.verified.issuance(key); ok {
		return iss, nil
	}
	serial := ca.SerialHex(leaf)
	iss, err := r.Store.LookupIssuance(ctx, serial)
	if errors.Is(err, journal.ErrNotFound) {
		return journal.Issuance{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonCertNotRecorded,
			fmt.Errorf("client certificate %s verifies but was never recorded as issued", serial))
	}
	if err != nil {
		return journal.Issuance{}, ca.Refuse(ca.KindUnavailable, ca.ReasonRenewalCheckFailed, err)
	}
	if iss.SPIFFEID != id.String() {
		return journal.Issuance{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonCertNotRecorded,
			fmt.Errorf("client certificate %s names %s but was recorded for %s", serial, id, iss.SPIFFEID))
	}
	// The serial and the identity are public: a leaf forged with a stolen
	// (say, tainted) intermediate key can copy both. Only the certificate
	// the CA issued, byte for byte, renews.
	if sum := sha256.Sum256(leaf.Raw); iss.CertSHA256 != hex.EncodeToString(sum[:]) {
		return journal.Issuance{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonCertNotRecorded,
			fmt.Errorf("client certificate %s is not the certificate recorded under that serial", serial))
	}
	r.verified.setIssuance(key, iss)
	return iss, nil
}

func (r *Renewal) checkEnrolment(ctx context.Context, enrolmentID string, id spiffeid.ID, now time.Time) error {
	e, err := r.Store.LookupEnrolment(ctx, enrolmentID)
	if errors.Is(err, journal.ErrNotFound) {
		return ca.Refuse(ca.KindDenied, ca.ReasonEnrolmentRevoked, fmt.Errorf("enrolment %q of %s does not exist", enrolmentID, id))
	}
	if err != nil {
		return ca.Refuse(ca.KindUnavailable, ca.ReasonRenewalCheckFailed, err)
	}
	if e.SPIFFEID != id.String() {
		return ca.Refuse(ca.KindDenied, ca.ReasonEnrolmentRevoked, fmt.Errorf("enrolment %s is for %s, not %s", e.ID, e.SPIFFEID, id))
	}
	if !e.RevokedAt.IsZero() {
		return ca.Refuse(ca.KindDenied, ca.ReasonEnrolmentRevoked,
			fmt.Errorf("enrolment %s of %s was revoked at %s", e.ID, id, e.RevokedAt.Format(time.RFC3339)))
	}
	maxAge := r.MaxEnrolmentAge
	if maxAge <= 0 {
		maxAge = DefaultMaxEnrolmentAge
	}
	if age := now.Sub(e.EnrolledAt); age > maxAge {
		return ca.Refuse(ca.KindDenied, ca.ReasonEnrolmentExpired,
			fmt.Errorf("enrolment %s of %s is %s old; the maximum is %s", e.ID, id, age.Round(time.Second), maxAge))
	}
	return nil
}

// verifyChain verifies a client chain against the bundle in force at now, as
// x509svid.Verify does, and returns the identity it names. A chain that
// verified before is not checked again while the root it chained to is still
// in the bundle and now is inside the validity of every certificate on its
// verified path: that is exactly when verifying it again would succeed.
//
// It also returns the key the chain is remembered under.
func (r *Renewal) verifyChain(chain []*x509.Certificate, now time.Time) (spiffeid.ID, [sha256.Size]byte, error) {
	if len(chain) == 0 {
		return spiffeid.ID{}, [sha256.Size]byte{}, errors.New("no client certificate")
	}
	key := chainKey(chain)
	if v, ok := r.verified.get(key); ok && v.validAt(now) {
		b, err := r.Bundle.GetX509BundleForTrustDomain(v.id.TrustDomain())
		if err == nil && b.HasX509Authority(v.anchor) {
			return v.id, key, nil
		}
	}
	id, chains, err := x509svid.Verify(chain, r.Bundle, x509svid.WithTime(now))
	if err != nil {
		r.verified.drop(key)
		return spiffeid.ID{}, key, err
	}
	v := verifiedChain{id: id, anchor: chains[0][len(chains[0])-1]}
	for i, c := range chains[0] {
		if i == 0 || c.NotBefore.After(v.notBefore) {
			v.notBefore = c.NotBefore
		}
		if i == 0 || c.NotAfter.Before(v.notAfter) {
			v.notAfter = c.NotAfter
		}
	}
	r.verified.put(key, v)
	return id, key, nil
}

// chainKey names a presented chain by its certificates' bytes.
func chainKey(chain []*x509.Certificate) [sha256.Size]byte {
	h := sha256.New()
	var n [8]byte
	for _, c := range chain {
		binary.BigEndian.PutUint64(n[:], uint64(len(c.Raw)))
		h.Write(n[:])
		h.Write(c.Raw)
	}
	var k [sha256.Size]byte
	h.Sum(k[:0])
	return k
}

// maxVerifiedChains bounds the chains a Renewal remembers: about one per
// connected agent. Past it, an arbitrary one is forgotten, and verified
// again on its next use.
const maxVerifiedChains = 8192

// verifiedChain is what a successful verification of a chain established.
type verifiedChain struct {
	id     spiffeid.ID
	anchor *x509.Certificate
	// notBefore and notAfter bound the time in which every certificate of
	// the verified path, the anchor included, is valid.
	notBefore, notAfter time.Time
	// iss is the journal's record of the leaf, once recordedIssuance has
	// checked it (recorded set).
	iss      journal.Issuance
	recorded bool
}

func (v verifiedChain) validAt(now time.Time) bool {
	return !now.Before(v.notBefore) && !now.After(v.notAfter)
}

// chainCache is a bounded set of verified chains; the zero value is ready.
type chainCache struct {
	mu sync.Mutex
	m  map[[sha256.Size]byte]verifiedChain
}

func (c *chainCache) get(k [sha256.Size]byte) (verifiedChain, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[k]
	return v, ok
}

func (c *chainCache) put(k [sha256.Size]byte, v verifiedChain) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.m == nil {
		c.m = make(map[[sha256.Size]byte]verifiedChain)
	}
	if _, ok := c.m[k]; !ok && len(c.m) >= maxVerifiedChains {
		for old := range c.m {
			delete(c.m, old)
			break
		}
	}
	c.m[k] = v
}

// issuance returns the leaf's checked record, if one is remembered with the
// chain k.
func (c *chainCache) issuance(k [sha256.Size]byte) (journal.Issuance, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	v, ok := c.m[k]
	return v.iss, ok && v.recorded
}

// setIssuance remembers the leaf's checked record with the chain k, if the
// chain is still remembered.
func (c *chainCache) setIssuance(k [sha256.Size]byte, iss journal.Issuance) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if v, ok := c.m[k]; ok {
		v.iss, v.recorded = iss, true
		c.m[k] = v
	}
}

func (c *chainCache) drop(k [sha256.Size]byte) {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.m, k)
}
