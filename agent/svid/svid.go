// Package svid generates the agent's private keys and certificate signing
// requests, and checks every certificate chain the CA returns before the agent
// uses it: it must chain to the current trust bundle, name exactly the agent's
// SPIFFE ID, hold the agent's public key and be valid now.
package svid

import (
	"bytes"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/url"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// KeyType names a private key algorithm the agent can generate.
type KeyType string

// The key types the agent generates. ECP256 is the default: it is what Envoy
// and every SPIFFE implementation handle, and it is cheap to rotate.
const (
	ECP256  KeyType = "ec-p256"
	ECP384  KeyType = "ec-p384"
	RSA2048 KeyType = "rsa-2048"
)

// KeyTypes lists the accepted key types, default first.
var KeyTypes = []KeyType{ECP256, ECP384, RSA2048}

// Errors that Verify returns, for callers that count or branch on them.
var (
	// ErrIdentityMismatch: the certificate names another SPIFFE ID than the
	// agent's own.
	ErrIdentityMismatch = errors.New("svid: certificate names another identity")
	// ErrKeyMismatch: the certificate does not hold the agent's public key.
	ErrKeyMismatch = errors.New("svid: certificate does not hold the agent's key")
	// ErrUntrusted: the chain is not a valid X.509-SVID under the trust
	// bundle at the given time.
	ErrUntrusted = errors.New("svid: certificate chain does not verify")
)

// ClockSkew is how far in the future a new certificate's NotBefore may lie
// and still be accepted, so that an agent whose clock runs slightly behind
// the CA's can use what it was just issued.
const ClockSkew = time.Minute

// ParseKeyType returns the key type named s.
func ParseKeyType(s string) (KeyType, error) {
	for _, kt := range KeyTypes {
		if string(kt) == s {
			return kt, nil
		}
	}
	return "", fmt.Errorf("svid: unknown key type %q (want one of %v)", s, KeyTypes)
}

// GenerateKey returns a new private key of type kt.
func GenerateKey(kt KeyType) (crypto.Signer, error) {
	var (
		key crypto.Signer
		err error
	)
	switch kt {
	case ECP256:
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case ECP384:
		key, err = ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	case RSA2048:
		key, err = rsa.GenerateKey(rand.Reader, 2048)
	default:
		return nil, fmt.Errorf("svid: unknown key type %q", kt)
	}
	if err != nil {
		return nil, fmt.Errorf("svid: generate %s key: %w", kt, err)
	}
	return key, nil
}

// NewCSR returns a PEM certificate signing request for key. When id is not
// zero, the request carries it as its only URI SAN; otherwise it carries no
// SAN, and the CA decides the identity from the caller's credential alone.
func NewCSR(key crypto.Signer, id spiffeid.ID) ([]byte, error) {
	tmpl := &x509.CertificateRequest{}
	if !id.IsZero() {
		tmpl.URIs = []*url.URL{id.URL()}
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, tmpl, key)
	if err != nil {
		return nil, fmt.Errorf("svid: create CSR: %w", err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}), nil
}

// VerifyRequest is what Verify checks a chain against.
type VerifyRequest struct {
	// Chain is what the CA returned: leaf first, then intermediates, maybe
	// ending with the root.
	Chain []*x509.Certificate
	// Key is the private key whose public half the leaf must hold.
	Key crypto.Signer
	// Bundle is the current trust bundle; the SVID must be in its trust
	// domain and chain to one of its roots.
	Bundle *x509bundle.Bundle
	// Want is the agent's SPIFFE ID. When zero (before the first issuance),
	// any ID in the bundle's trust domain is accepted.
	Want spiffeid.ID
	// Now is the time at which the chain must be valid.
	Now time.Time
}

// Verify checks a chain the CA returned and turns it into the SVID the agent
// serves. Trailing self-signed roots are dropped from the chain: workloads
// get the roots from the bundle.
func Verify(req VerifyRequest) (*x509svid.SVID, error) {
	chain := trimRoots(req.Chain)
	if len(chain) == 0 {
		return nil, fmt.Errorf("%w: empty chain", ErrUntrusted)
	}
	if req.Bundle == nil {
		return nil, fmt.Errorf("%w: no trust bundle yet", ErrUntrusted)
	}
	leaf := chain[0]
	if !publicKeyEqual(leaf.PublicKey, req.Key.Public()) {
		return nil, ErrKeyMismatch
	}
	at := req.Now
	if at.Before(leaf.NotBefore) && leaf.NotBefore.Sub(at) <= ClockSkew {
		at = leaf.NotBefore
	}
	if !req.Now.Before(leaf.NotAfter) {
		return nil, fmt.Errorf("%w: certificate expired at %s", ErrUntrusted, leaf.NotAfter.UTC().Format(time.RFC3339))
	}
	id, _, err := x509svid.Verify(chain, req.Bundle, x509svid.WithTime(at))
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrUntrusted, err)
	}
	if !req.Want.IsZero() && id != req.Want {
		return nil, fmt.Errorf("%w: got %s, want %s", ErrIdentityMismatch, id, req.Want)
	}
	return &x509svid.SVID{ID: id, Certificates: chain, PrivateKey: req.Key}, nil
}

// trimRoots drops trailing self-signed CA certificates.
func trimRoots(chain []*x509.Certificate) []*x509.Certificate {
	for len(chain) > 1 {
		last := chain[len(chain)-1]
		if !last.IsCA || !bytes.Equal(last.RawIssuer, last.RawSubject) || last.CheckSignatureFrom(last) != nil {
			break
		}
		chain = chain[:len(chain)-1]
	}
	return chain
}

func publicKeyEqual(a, b crypto.PublicKey) bool {
	eq, ok := a.(interface{ Equal(crypto.PublicKey) bool })
	return ok && eq.Equal(b)
}

// Expiry returns when s stops being valid: the earliest NotAfter in its chain.
func Expiry(s *x509svid.SVID) time.Time {
	var t time.Time
	for i, c := range s.Certificates {
		if i == 0 || c.NotAfter.Before(t) {
			t = c.NotAfter
		}
	}
	return t
}
