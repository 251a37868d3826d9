package authn

import (
	"context"
	"errors"
	"fmt"
	"strings"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"k8s.io/apimachinery/pkg/util/validation"

	"github.com/trustmesh/trustmesh/ca"
)

// Node authentication methods, as ca.Node.Method.
const (
	MethodNodeX509       = "node-x509"
	MethodNodeKubernetes = ca.MethodNodeKubernetes
)

// PodLocator finds the node a pod runs on, and the pod's UID; the control
// plane implements it, over the mesh model, with a bounded retry inside for
// a pod just created.
type PodLocator interface {
	NodeOfPod(ctx context.Context, namespace, name string) (node, uid string, err error)
}

// NodeAuthenticator decides which node, if any, is calling the node
// service. Delegation is off for every caller it does not name a node for.
//
// A node proves itself with its node SVID, spiffe://TD/node/NAME, as the TLS
// client certificate (checked exactly as a renewal is: it chains to the
// bundle, was recorded, and its enrolment still stands); or, on Kubernetes,
// with its own pod-bound service-account token, whose account must be one
// of TrustedAccounts. The node is then the one the token's node claim
// names, or else the one its pod runs on, if that pod is still the one the
// token was bound to (its UID; a pod of the same name made since is
// another). A token bound to no pod never names a node.
type NodeAuthenticator struct {
	TrustDomain spiffeid.TrustDomain
	// Renewal verifies a node SVID chain.
	Renewal *Renewal
	// Kubernetes is nil off Kubernetes.
	Kubernetes *Kubernetes
	// TrustedAccounts are "namespace/serviceaccount"; empty trusts no
	// Kubernetes node.
	TrustedAccounts []string
	// Pods locates the pod of a token that carries no node claim.
	Pods PodLocator
}

func notTrusted(format string, args ...any) error {
	return ca.Refuse(ca.KindDenied, ca.ReasonNodeNotTrusted, fmt.Errorf(format, args...))
}

// Authenticate returns the node the credentials prove. A bearer token wins
// over a client certificate, as for the certificate service.
func (a *NodeAuthenticator) Authenticate(ctx context.Context, creds Credentials) (ca.Node, error) {
	switch {
	case creds.BearerToken != "" && IsJoinToken(creds.BearerToken):
		return ca.Node{}, notTrusted("a join token does not authenticate a node; enrol with it and call with the node SVID")
	case creds.BearerToken != "":
		return a.kubernetes(ctx, creds.BearerToken)
	case len(creds.PeerCertificates) > 0:
		return a.x509(ctx, creds)
	}
	return ca.Node{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonNoCredentials, errors.New("no bearer token and no client certificate"))
}

func (a *NodeAuthenticator) x509(ctx context.Context, creds Credentials) (ca.Node, error) {
	if a.Renewal == nil {
		return ca.Node{}, notTrusted("node certificates are not accepted")
	}
	caller, err := a.Renewal.Authenticate(ctx, creds.PeerCertificates)
	if err != nil {
		return ca.Node{}, err
	}
	name, err := NodeNameOf(a.TrustDomain, caller.ID)
	if err != nil {
		return ca.Node{}, notTrusted("%w", err)
	}
	return ca.Node{Name: name, ID: caller.ID, Method: MethodNodeX509, Subject: caller.Subject}, nil
}

// NodeNameOf returns NAME for spiffe://TD/node/NAME, with NAME a valid
// Kubernetes node name (a DNS-1123 subdomain); an error for any other ID.
func NodeNameOf(td spiffeid.TrustDomain, id spiffeid.ID) (string, error) {
	if id.TrustDomain() != td {
		return "", fmt.Errorf("%s is not in trust domain %s", id, td)
	}
	name, ok := strings.CutPrefix(id.Path(), ca.NodePathPrefix)
	if !ok || name == "" || strings.Contains(name, "/") {
		return "", fmt.Errorf("%s is not a node identity (spiffe://%s/node/NAME)", id, td)
	}
	if errs := validation.IsDNS1123Subdomain(name); len(errs) > 0 {
		return "", fmt.Errorf("%s: node name %q is invalid: %s", id, name, strings.Join(errs, "; "))
	}
	return name, nil
}

func (a *NodeAuthenticator) kubernetes(ctx context.Context, token string) (ca.Node, error) {
	if a.Kubernetes == nil {
		if !looksLikeJWT(token) {
			return ca.Node{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonJoinTokenMalformed,
				errors.New("the bearer token is neither a join token nor a JWT"))
		}
		return ca.Node{}, ca.Refuse(ca.KindUnauthenticated, ca.ReasonKubernetesOff,
			errors.New("a Kubernetes token was sent, and Kubernetes authentication is off"))
	}
	r, err := a.Kubernetes.Review(ctx, token)
	if err != nil {
		return ca.Node{}, err
	}
	ns, sa, ok := parseServiceAccountUser(r.Caller.Subject)
	if !ok {
		return ca.Node{}, notTrusted("token user %q is not a service account", r.Caller.Subject)
	}
	if !contains(a.TrustedAccounts, ns+"/"+sa) {
		return ca.Node{}, notTrusted("service account %s/%s is not trusted for delegation", ns, sa)
	}
	node := ca.Node{ID: r.Caller.ID, Method: MethodNodeKubernetes, Subject: r.Caller.Subject}
	if name := r.Value(ExtraNodeName); name != "" {
		node.Name = name
	} else {
		pod := r.Value(ExtraPodName)
		if pod == "" {
			return ca.Node{}, notTrusted("the token of %s/%s is bound to no pod; a node agent needs its pod-bound token", ns, sa)
		}
		podUID := r.Value(ExtraPodUID)
		if podUID == "" {
			return ca.Node{}, notTrusted("the token of %s/%s names pod %s but not its UID", ns, sa, pod)
		}
		if a.Pods == nil {
			return ca.Node{}, notTrusted("the token names no node, and no pod locator is configured")
		}
		name, uid, err := a.Pods.NodeOfPod(ctx, ns, pod)
		if err != nil {
			if rf, ok := ca.AsRefusal(err); ok {
				return ca.Node{}, rf
			}
			if ctx.Err() != nil {
				return ca.Node{}, ca.Refuse(ca.KindUnavailable, ca.ReasonNodeCheckFailed, fmt.Errorf("locate pod %s/%s: %w", ns, pod, err))
			}
			return ca.Node{}, notTrusted("locate pod %s/%s: %w", ns, pod, err)
		}
		if uid != podUID {
			// The token outlives its pod by up to the review cache's TTL,
			// and a pod's name may be taken again, on another node.
			return ca.Node{}, notTrusted("the token was bound to pod %s/%s with UID %s, and the pod of that name is now UID %s", ns, pod, podUID, uid)
		}
		node.Name = name
	}
	if errs := validation.IsDNS1123Subdomain(node.Name); len(errs) > 0 {
		return ca.Node{}, notTrusted("node name %q is invalid: %s", node.Name, strings.Join(errs, "; "))
	}
	return node, nil
}
