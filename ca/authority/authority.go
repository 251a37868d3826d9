// Package authority holds the CA's key material: the signing key, reached
// only as a crypto.Signer through a KMS key URI, the issuing certificate and
// its chain, and the trust bundle of roots. The material is either managed by
// trustmesh in its data directory or supplied by the operator in Istio's
// cacerts layout.
package authority

import (
	"crypto"
	"crypto/x509"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// Material is one consistent set of CA credentials.
type Material struct {
	// Signer is the issuing CA's private key.
	Signer crypto.Signer
	// Cert is the issuing CA certificate, whose key is Signer.
	Cert *x509.Certificate
	// Chain is Cert followed by any further intermediates, up to but not
	// including a root. Issued certificates carry it.
	Chain []*x509.Certificate
	// Roots is the trust bundle. It never holds intermediates. During a
	// rotation it holds the next root before anything is signed under it,
	// and the previous root until everything signed under it has expired.
	Roots []*x509.Certificate
	// Anchor is the root that Chain ends at; Validate sets it.
	Anchor *x509.Certificate
	// Tainted are CA certificates marked compromised (ca rotate --taint).
	// They sign nothing more; the bundle stream carries them beside the
	// roots, so that agents holding a certificate under one renew at once.
	Tainted []*x509.Certificate
}

// Authority serves the current material and the trust bundle built from it,
// and tells watchers when the bundle changes.
type Authority struct {
	td spiffeid.TrustDomain

	mu       sync.RWMutex
	material *Material
	bundle   *spiffebundle.Bundle
	seq      uint64
	changed  chan struct{}
}

// New returns an Authority serving m.
func New(td spiffeid.TrustDomain, m *Material) *Authority {
	a := &Authority{td: td, changed: make(chan struct{})}
	a.set(m)
	return a
}

// TrustDomain is the trust domain the authority issues for.
func (a *Authority) TrustDomain() spiffeid.TrustDomain { return a.td }

// Current returns the material in force.
func (a *Authority) Current() *Material {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.material
}

// Replace puts new material in force and wakes bundle watchers.
func (a *Authority) Replace(m *Material) { a.set(m) }

func (a *Authority) set(m *Material) {
	a.mu.Lock()
	defer a.mu.Unlock()
	a.seq++
	b := spiffebundle.FromX509Authorities(a.td, m.Roots)
	b.SetSequenceNumber(a.seq)
	a.material, a.bundle = m, b
	close(a.changed)
	a.changed = make(chan struct{})
}

// Bundle returns the current trust bundle and a channel that is closed when
// it is replaced.
func (a *Authority) Bundle() (*spiffebundle.Bundle, <-chan struct{}) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.bundle, a.changed
}

// Published returns what the CA publishes to agents, read at one instant:
// the trust bundle, the CA certificates marked compromised, and a channel
// closed when either is replaced.
func (a *Authority) Published() (*spiffebundle.Bundle, []*x509.Certificate, <-chan struct{}) {
	a.mu.RLock()
	defer a.mu.RUnlock()
	return a.bundle, a.material.Tainted, a.changed
}

// GetX509BundleForTrustDomain implements x509bundle.Source.
func (a *Authority) GetX509BundleForTrustDomain(td spiffeid.TrustDomain) (*x509bundle.Bundle, error) {
	b, _ := a.Bundle()
	return b.GetX509BundleForTrustDomain(td)
}

// GetBundleForTrustDomain implements spiffebundle.Source.
func (a *Authority) GetBundleForTrustDomain(td spiffeid.TrustDomain) (*spiffebundle.Bundle, error) {
	b, _ := a.Bundle()
	return b.GetBundleForTrustDomain(td)
}

var (
	_ x509bundle.Source   = (*Authority)(nil)
	_ spiffebundle.Source = (*Authority)(nil)
)
