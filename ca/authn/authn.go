// Package authn decides who is calling the CA. A caller proves an identity
// with a Kubernetes service-account token (checked by TokenReview), a
// one-time join token, or its current trustmesh certificate when renewing.
// Each authenticator yields a ca.Caller or a *ca.Refusal; nothing here looks
// at the CSR.
package authn

import (
	"context"
	"crypto/x509"
	"errors"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca"
)

// Credentials are what a request carried.
type Credentials struct {
	// BearerToken is the token from "authorization: Bearer …" metadata.
	BearerToken string
	// PeerCertificates is the TLS client chain, leaf first, unverified.
	PeerCertificates []*x509.Certificate
}

// Authenticator picks the means the credentials call for.
type Authenticator struct {
	TrustDomain spiffeid.TrustDomain
	// Kubernetes is nil when the CA runs off Kubernetes.
	Kubernetes *Kubernetes
	JoinTokens *JoinTokens
	Renewal    *Renewal
}

// Authenticate returns the caller the credentials prove. A bearer token wins
// over a client certificate, as Istio's CA does, so an istio-agent that
// always sends its token is judged by it.
func (a *Authenticator) Authenticate(ctx context.Context, creds Credentials) (ca.Caller, error) {
	switch {
	case creds.BearerToken != "" && IsJoinToken(creds.BearerToken):
		return a.JoinTokens.Authenticate(ctx, creds.BearerToken)
	case creds.BearerToken != "":
		if a.Kubernetes == nil {
			if !looksLikeJWT(creds.BearerToken) {
				// Off Kubernetes, a join token is the only bearer token
				// there is: this one is a mangled join token.
				return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonJoinTokenMalformed,
					errors.New("the bearer token is neither a join token nor a JWT"))
			}
			return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonKubernetesOff,
				errors.New("a Kubernetes token was sent, and Kubernetes authentication is off"))
		}
		return a.Kubernetes.Authenticate(ctx, creds.BearerToken)
	case len(creds.PeerCertificates) > 0:
		return a.Renewal.Authenticate(ctx, creds.PeerCertificates)
	}
	return ca.Caller{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonNoCredentials, errors.New("no bearer token and no client certificate"))
}

// looksLikeJWT reports whether tok has the shape of a compact JWT: three
// non-empty dot-separated parts. Nothing in it is checked.
func looksLikeJWT(tok string) bool {
	parts := strings.Split(tok, ".")
	return len(parts) == 3 && parts[0] != "" && parts[1] != "" && parts[2] != ""
}

// BearerFromHeader extracts the token from an authorization header value.
func BearerFromHeader(v string) (string, bool) {
	const prefix = "bearer "
	if len(v) <= len(prefix) || !strings.EqualFold(v[:len(prefix)], prefix) {
		return "", false
	}
	return strings.TrimSpace(v[len(prefix):]), true
}
