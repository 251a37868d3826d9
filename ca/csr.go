package ca

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/x509"
	"encoding/asn1"
	"encoding/pem"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
)

// MaxCSRSize is the largest CSR, in bytes of PEM (or of DER, for the node
// service), that is parsed at all.
const MaxCSRSize = 16 << 10

var (
	oidSubjectAltName   = asn1.ObjectIdentifier{2, 5, 29, 17}
	oidBasicConstraints = asn1.ObjectIdentifier{2, 5, 29, 19}
	oidKeyUsage         = asn1.ObjectIdentifier{2, 5, 29, 15}
)

// GeneralName tags (RFC 5280, 4.2.1.6), context-specific.
const (
	tagURI = 6
)

// parseCSR applies every rule a CSR must pass, for a caller whose identity is
// already decided, and returns the parsed request. The CSR only contributes
// its public key: the identity, lifetime and extensions of the certificate
// are the CA's.
func parseCSR(csrPEM []byte, id spiffeid.ID) (*x509.CertificateRequest, error) {
	if len(csrPEM) > MaxCSRSize {
		return nil, refuse(ReasonCSRTooLarge, KindInvalid, "CSR is %d bytes; the limit is %d", len(csrPEM), MaxCSRSize)
	}
	block, rest := pem.Decode(csrPEM)
	if block == nil || block.Type != "CERTIFICATE REQUEST" && block.Type != "NEW CERTIFICATE REQUEST" {
		return nil, refuse(ReasonCSRMalformed, KindInvalid, "CSR is not a PEM CERTIFICATE REQUEST")
	}
	if extra, _ := pem.Decode(rest); extra != nil {
		return nil, refuse(ReasonCSRMalformed, KindInvalid, "CSR holds more than one PEM block")
	}
	return parseCSRDER(block.Bytes, id)
}

// parseCSRDER is parseCSR for a DER-encoded request, as the node service
// carries them.
func parseCSRDER(der []byte, id spiffeid.ID) (*x509.CertificateRequest, error) {
	if len(der) > MaxCSRSize {
		return nil, refuse(ReasonCSRTooLarge, KindInvalid, "CSR is %d bytes; the limit is %d", len(der), MaxCSRSize)
	}
	csr, err := x509.ParseCertificateRequest(der)
	if err != nil {
		return nil, refuseErr(ReasonCSRMalformed, KindInvalid, fmt.Errorf("parse CSR: %w", err))
	}
	if err := csr.CheckSignature(); err != nil {
		return nil, refuseErr(ReasonCSRSignature, KindInvalid, fmt.Errorf("CSR signature: %w", err))
	}
	if err := checkKey(csr.PublicKey); err != nil {
		return nil, err
	}
	// The parsed SAN fields skip name types Go does not model, so the
	// extension itself is read: every name in it must be a URI equal to the
	// caller's SPIFFE ID.
	for _, ext := range csr.Extensions {
		switch {
		case ext.Id.Equal(oidSubjectAltName):
			if err := checkSANs(ext.Value, id); err != nil {
				return nil, err
			}
		case ext.Id.Equal(oidBasicConstraints):
			var bc struct {
				IsCA       bool `asn1:"optional"`
				MaxPathLen int  `asn1:"optional,default:-1"`
			}
			if _, err := asn1.Unmarshal(ext.Value, &bc); err != nil {
				return nil, refuseErr(ReasonCSRMalformed, KindInvalid, fmt.Errorf("CSR basic constraints: %w", err))
			}
			if bc.IsCA {
				return nil, refuse(ReasonCSRCA, KindInvalid, "CSR asks to be a CA")
			}
		case ext.Id.Equal(oidKeyUsage):
			var bits asn1.BitString
			if _, err := asn1.Unmarshal(ext.Value, &bits); err != nil {
				return nil, refuseErr(ReasonCSRMalformed, KindInvalid, fmt.Errorf("CSR key usage: %w", err))
			}
			// keyCertSign is bit 5 and cRLSign bit 6.
			if bits.At(5) == 1 || bits.At(6) == 1 {
				return nil, refuse(ReasonCSRCA, KindInvalid, "CSR asks for certificate or CRL signing")
			}
		}
	}
	return csr, nil
}

func checkSANs(value []byte, id spiffeid.ID) error {
	var names []asn1.RawValue
	rest, err := asn1.Unmarshal(value, &names)
	if err != nil || len(rest) > 0 {
		return refuse(ReasonCSRMalformed, KindInvalid, "CSR subject alternative names are malformed")
	}
	for _, n := range names {
		if n.Class != asn1.ClassContextSpecific || n.Tag != tagURI {
			return refuse(ReasonCSRIdentity, KindInvalid, "CSR names an identity other than a URI (GeneralName tag %d)", n.Tag)
		}
		if string(n.Bytes) != id.String() {
			return refuse(ReasonCSRIdentity, KindInvalid, "CSR names %q, but the caller is %q", n.Bytes, id)
		}
	}
	return nil
}

func checkKey(pub any) error {
	switch k := pub.(type) {
	case *ecdsa.PublicKey:
		if k.Curve != elliptic.P256() && k.Curve != elliptic.P384() {
			return refuse(ReasonCSRKey, KindInvalid, "ECDSA curve %s is not accepted; use P-256 or P-384", k.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if bits := k.N.BitLen(); bits < 2048 || bits > 4096 {
			return refuse(ReasonCSRKey, KindInvalid, "RSA key of %d bits is not accepted; use 2048 to 4096", bits)
		}
	case ed25519.PublicKey:
	default:
		return refuse(ReasonCSRKey, KindInvalid, "key type %T is not accepted", pub)
	}
	return nil
}
