package engine_test

import (
	"context"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/engine/explaintest"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// peerPolicies deny the peers of namespace x (and service account x/y, and
// principals ending in /ns/x/sa/y) in namespaces of their own; namespace
// open has no policy at all.
const peerPolicies = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-ns, namespace: deny-ns}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["x"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-ns-prefix, namespace: deny-ns-prefix}
spec:
  action: DENY
  rules: [{from: [{source: {namespaces: ["x*"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-sa, namespace: deny-sa}
spec:
  action: DENY
  rules: [{from: [{source: {serviceAccounts: ["x/y"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-principal, namespace: deny-principal}
spec:
  action: DENY
  rules: [{from: [{source: {principals: ["*/ns/x/sa/y"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-ns, namespace: allow-ns}
spec:
  action: ALLOW
  rules: [{from: [{source: {namespaces: ["x"]}}]}]
`

func peerCheck(dstNS, principal string, tcp bool) *authv3.CheckRequest {
	addr := func(ip string, port uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
	}
	a := &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: principal, Address: addr("10.0.0.9", 40000)},
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/" + dstNS + "/sa/app", Address: addr("10.0.1.1", 8080)},
	}
	if !tcp {
		a.Request = &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "GET", Path: "/", Host: "app.example.com"}}
	}
	return &authv3.CheckRequest{Attributes: a}
}

// malformedPeers are source principals that are not well-formed SPIFFE
// IDs. The first ones read as namespace x, service account y to the parts
// of the ID, yet Istio's regexps (whose "." stops at a newline) would not
// match them; the others are what else a foreign CA or a caller of
// ext_authz could present.
var malformedPeers = map[string]string{
	"newline in the trust domain":         "spiffe://t\nd/ns/x/sa/y",
	"newline after the trust domain":      "spiffe://td\n/ns/x/sa/y",
	"newline in the service account":      "spiffe://td/ns/x/sa/y\n",
	"newline before the trust domain":     "spiffe://\ntd/ns/x/sa/y",
	"carriage return":                     "spiffe://t\rd/ns/x/sa/y",
	"tab":                                 "spiffe://td/ns/x/sa/\ty",
	"space":                               "spiffe://td/ns/x/sa/y z",
	"NUL":                                 "spiffe://td\x00/ns/x/sa/y",
	"DEL":                                 "spiffe://td/ns/x/sa/y\x7f",
	"invalid UTF-8":                       "spiffe://td/ns/x/sa/y\xff",
	"line separator U+2028":               "spiffe://td/ns/x/sa/y\u2028",
	"non-ASCII letter":                    "spiffe://td/ns/x/sa/é",
	"percent-encoded newline":             "spiffe://t%0ad/ns/x/sa/y",
	"upper-case trust domain":             "spiffe://TD/ns/x/sa/y",
	"upper-case scheme":                   "SPIFFE://td/ns/x/sa/y",
	"port":                                "spiffe://td:443/ns/x/sa/y",
	"user":                                "spiffe://u@td/ns/x/sa/y",
	"query":                               "spiffe://td/ns/x/sa/y?a",
	"fragment":                            "spiffe://td/ns/x/sa/y#a",
	"empty segment":                       "spiffe://td/ns/x//sa/y",
	"trailing slash":                      "spiffe://td/ns/x/sa/y/",
	"dot segment":                         "spiffe://td/ns/x/sa/./y",
	"dot-dot segment":                     "spiffe://td/ns/x/sa/../y",
	"no trust domain":                     "spiffe:///ns/x/sa/y",
	"not a SPIFFE ID (a certificate DN)":  "CN=x,O=y",
	"not a SPIFFE ID (another URI)":       "https://td/ns/x/sa/y",
	"not a SPIFFE ID (a DNS name)":        "web.x.svc.cluster.local",
	"newline in an ID for another policy": "spiffe://td/ns/x\n/sa/y",
}

// TestMalformedPeerIsDeniedUnevaluated: a source principal that is not a
// well-formed SPIFFE ID is denied before any policy is evaluated, whatever
// the policies say, with its own reason and the principal quoted in the
// error. Before, "spiffe://t\nd/ns/x/sa/y" passed a DENY on namespace x,
// whose Istio regexp stops at the newline, while an ALLOW on namespace x
// let it in.
func TestMalformedPeerIsDeniedUnevaluated(t *testing.T) {
	ps, err := policy.ParseYAML("peer.yaml", []byte(peerPolicies), "istio-system")
	if err != nil {
		t.Fatal(err)
	}
	set, err := engine.Build(context.Background(), engine.SetConfig{Policies: ps})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for name, peer := range malformedPeers {
		for _, ns := range []string{"deny-ns", "deny-ns-prefix", "deny-sa", "deny-principal", "allow-ns", "open"} {
			for _, tcp := range []bool{false, true} {
				d, err := set.Check(ctx, peerCheck(ns, peer, tcp))
				if err != nil {
					t.Fatalf("%s to %s: %v", name, ns, err)
				}
				if d.Allowed || d.Reason != engine.ReasonPeerRejected || d.Policy != "" || d.HTTPStatus != 403 {
					t.Errorf("%s (%q) to %s (tcp %v): allowed %v, reason %q, policy %q, status %d; want denied, %q, no policy",
						name, peer, ns, tcp, d.Allowed, d.Reason, d.Policy, d.HTTPStatus, engine.ReasonPeerRejected)
					continue
				}
				if !strings.Contains(d.Error, engine.ErrPeerRejected.Error()) || strings.ContainsAny(d.Error, "\n\r\t\x00\x7f") {
					t.Errorf("%s: error %q does not say why, or carries a control character as is", name, d.Error)
				}
			}
		}
		if _, ok := engine.ParseIdentity(peer); ok {
			t.Errorf("ParseIdentity(%q) accepted it", peer)
		}
	}
}

// TestWellFormedPeersAreEvaluated holds the controls: well-formed IDs,
// including upper case in the path (which SPIFFE allows) and IDs longer
// than .../ns/NS/sa/SA, and requests without a peer, are decided by the
// policies as before.
func TestWellFormedPeersAreEvaluated(t *testing.T) {
	ps, err := policy.ParseYAML("peer.yaml", []byte(peerPolicies), "istio-system")
	if err != nil {
		t.Fatal(err)
	}
	set, err := engine.Build(context.Background(), engine.SetConfig{Policies: ps})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ns, peer string
		allowed  bool
		reason   string
	}{
		{"deny-ns", "spiffe://td/ns/x/sa/y", false, engine.ReasonDenyMatched},
		{"deny-ns", "spiffe://t_d-1.example/ns/x/sa/y", false, engine.ReasonDenyMatched},
		{"deny-ns", "spiffe://td/gw/ns/x/sa/y", false, engine.ReasonDenyMatched}, // Istio's regexp on a longer ID
		{"deny-ns", "spiffe://td/ns/z/sa/y", true, engine.ReasonNoPolicy},
		{"deny-ns", "spiffe://td/ns/z/sa/Web", true, engine.ReasonNoPolicy},
		{"deny-ns", "spiffe://td", true, engine.ReasonNoPolicy},
		{"deny-ns", "", true, engine.ReasonNoPolicy},
		{"deny-sa", "spiffe://td/ns/x/sa/y", false, engine.ReasonDenyMatched},
		{"deny-principal", "spiffe://td/ns/x/sa/y", false, engine.ReasonDenyMatched},
		{"allow-ns", "spiffe://td/ns/x/sa/y", true, engine.ReasonAllowMatched},
		{"allow-ns", "spiffe://td/ns/z/sa/y", false, engine.ReasonNoAllowMatched},
		{"allow-ns", "", false, engine.ReasonNoAllowMatched},
		{"open", "spiffe://td/ns/x/sa/y", true, engine.ReasonNoPolicy},
		{"open", "", true, engine.ReasonNoPolicy},
	} {
		d, err := set.Check(context.Background(), peerCheck(tc.ns, tc.peer, false))
		if err != nil {
			t.Fatal(err)
		}
		if d.Allowed != tc.allowed {
			t.Errorf("%q to %s: allowed %v (%s), want %v", tc.peer, tc.ns, d.Allowed, d.Reason, tc.allowed)
		}
		if !tc.allowed && d.Reason != tc.reason {
			t.Errorf("%q to %s: reason %q, want %q", tc.peer, tc.ns, d.Reason, tc.reason)
		}
	}
}

// TestParseIdentity: the parts of well-formed IDs.
func TestParseIdentity(t *testing.T) {
	for _, tc := range []struct {
		id   string
		want engine.Identity
	}{
		{"spiffe://cluster.local/ns/foo/sa/bar", engine.Identity{Principal: "cluster.local/ns/foo/sa/bar", TrustDomain: "cluster.local", Namespace: "foo", ServiceAccount: "bar"}},
		{"spiffe://td/ns/foo/sa/Bar_1.x", engine.Identity{Principal: "td/ns/foo/sa/Bar_1.x", TrustDomain: "td", Namespace: "foo", ServiceAccount: "Bar_1.x"}},
		{"spiffe://td/gw/ns/foo/sa/bar", engine.Identity{Principal: "td/gw/ns/foo/sa/bar", TrustDomain: "td"}},
		{"spiffe://td", engine.Identity{Principal: "td", TrustDomain: "td"}},
	} {
		got, ok := engine.ParseIdentity(tc.id)
		if !ok || got != tc.want {
			t.Errorf("ParseIdentity(%q) = %+v, %v; want %+v", tc.id, got, ok, tc.want)
		}
	}
}

// TestExplainMalformedPeer: policy explain gives Check's decision for a
// malformed peer and says that no policy was evaluated, and why.
func TestExplainMalformedPeer(t *testing.T) {
	ps, err := policy.ParseYAML("peer.yaml", []byte(peerPolicies), "istio-system")
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	set, err := engine.Build(ctx, engine.SetConfig{Policies: ps})
	if err != nil {
		t.Fatal(err)
	}
	req := peerCheck("deny-ns", "spiffe://t\nd/ns/x/sa/y", false)
	ex, err := set.Explain(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	d, _ := set.Check(ctx, req)
	if ex.Evaluated || len(ex.Policies) != 0 || ex.Decision.Reason != engine.ReasonPeerRejected || ex.Decision.Allowed {
		t.Errorf("explanation: evaluated %v, %d policies, decision %+v", ex.Evaluated, len(ex.Policies), ex.Decision)
	}
	if !strings.Contains(ex.Note, "not a well-formed SPIFFE ID") {
		t.Errorf("note %q does not say why no policy was evaluated", ex.Note)
	}
	if bad := explaintest.Disagreements(ex, d, nil); len(bad) != 0 {
		t.Errorf("explain disagrees with Check: %v", bad)
	}
}
