package proxyconfig_test

import (
	"regexp"
	"testing"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// TestProxylessDeniesNewlinePeers: the RBAC back end matches DENY
// namespaces and serviceAccounts with Istio's regexps, whose "." stops at a
// newline, and ALLOW namespaces with [^/], which does not, so a peer
// spiffe://t\nd/ns/x/sa/y would pass a DENY on namespace x. grpc-go's
// crypto/x509 refuses such a certificate already (url.Parse rejects control
// bytes in a URI SAN); the proxyless chain's first filter denies it too,
// whichever TLS stack the server has: it denies every peer without a URI
// SAN in the trust domain matched in full by a regexp whose "." excludes a
// newline. Evaluated here with Go's regexp, whose "." and [^/] read a
// newline as RE2's do.
func TestProxylessDeniesNewlinePeers(t *testing.T) {
	b := proxyconfig.NewBuilder(testConfig(t), &mesh.Mesh{}, parse(t, `{action: DENY, rules: [{from: [{source: {namespaces: [x]}}]}]}`))
	chain, err := b.ProxylessRBAC("ns-a", nil)
	if err != nil {
		t.Fatal(err)
	}
	p := chain[0].GetRules().GetPolicies()["trustmesh-trust-domain"]
	re, err := regexp.Compile(p.GetPrincipals()[0].GetNotId().GetAuthenticated().GetPrincipalName().GetSafeRegex().GetRegex())
	if err != nil {
		t.Fatal(err)
	}
	denied := func(uri string) bool { return !re.MatchString(uri) } // not_id of the one SAN
	for _, id := range []string{
		"spiffe://cluster.local/ns/x\n/sa/y",
		"spiffe://cluster.local\n/ns/x/sa/y",
		"spiffe://cluster.local/ns/x/sa/y\n",
		"spiffe://cluster.local/\nns/x/sa/y",
		"spiffe://c\nluster.local/ns/x/sa/y",
	} {
		if !denied(id) {
			t.Errorf("%q passes the trust-domain filter", id)
		}
	}
	if denied("spiffe://cluster.local/ns/x/sa/y") || denied("spiffe://cluster.local/ns/z/sa/Web_1") {
		t.Error("the trust-domain filter denies a well-formed peer of the trust domain")
	}
}
