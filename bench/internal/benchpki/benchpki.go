// Package benchpki makes the certificates that the benchmarks' own floors
// serve with and sign.
package benchpki

import (
	"crypto"
	"crypto/rand"
	"crypto/x509"
	"math/big"
	"time"
)

// Sign makes a certificate for pub, signed by parentKey as parent
// (self-signed when parent is nil), with a random 128-bit serial, valid
// from a minute before now for a day and shaped by set. It returns the
// DER, whose signature crypto/x509 has checked under parentKey.
func Sign(parent *x509.Certificate, parentKey crypto.Signer, pub crypto.PublicKey, now time.Time, set func(*x509.Certificate)) ([]byte, error) {
	serial, err := rand.Int(rand.Reader, new(big.Int).Lsh(big.NewInt(1), 128))
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{SerialNumber: serial, NotBefore: now.Add(-time.Minute), NotAfter: now.Add(24 * time.Hour), BasicConstraintsValid: true}
	set(tmpl)
	if parent == nil {
		parent = tmpl
	}
	return x509.CreateCertificate(rand.Reader, tmpl, parent, pub, parentKey)
}
