// Package identity holds the agent's current identity: the X.509-SVID it was
// issued and the trust bundle of its trust domain. The rotation manager and
// the bundle follower write it; the Workload API, SDS, the certificate
// directory and the state directory read it and are told of every change.
package identity

import (
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// Snapshot is one consistent view of the identity. Its values are never
// modified after they are stored, so readers may keep them.
type Snapshot struct {
	// SVID is the current certificate and key; nil until the first issuance
	// and after the certificate expired without a renewal.
	SVID *x509svid.SVID
	// Bundle is the trust bundle of the agent's trust domain; nil until the
	// CA's bundle stream (or the state directory) provided one.
	Bundle *x509bundle.Bundle
	// Version increases with every change.
	Version uint64
}

// Ready reports whether the snapshot can be handed to a workload.
func (s Snapshot) Ready() bool { return s.SVID != nil && s.Bundle != nil }

// Store is the agent's identity, with change notification. The zero value is
// not usable; use New.
type Store struct {
	mu      sync.Mutex
	snap    Snapshot
	changed chan struct{}
}

// New returns an empty store.
func New() *Store {
	return &Store{changed: make(chan struct{})}
}

// Load returns the current snapshot and a channel that is closed at the next
// change after it.
func (s *Store) Load() (Snapshot, <-chan struct{}) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.snap, s.changed
}

// SetSVID replaces the SVID. The caller must not modify svid afterwards.
func (s *Store) SetSVID(svid *x509svid.SVID) {
	s.update(func(snap *Snapshot) { snap.SVID = svid })
}

// SetBundle replaces the trust bundle. The caller must not modify bundle
// afterwards.
func (s *Store) SetBundle(bundle *x509bundle.Bundle) {
	s.update(func(snap *Snapshot) { snap.Bundle = bundle })
}

func (s *Store) update(f func(*Snapshot)) {
	s.mu.Lock()
	defer s.mu.Unlock()
	f(&s.snap)
	s.snap.Version++
	close(s.changed)
	s.changed = make(chan struct{})
}
