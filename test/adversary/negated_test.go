package adversary

import "testing"

// TestNegatedMatchersOnAbsentAttributes (class 1): as in Istio and Envoy
// RBAC, a negated matcher holds when the request lacks the attribute, so
// the documented "require mTLS" DENY denies a plaintext request.
func TestNegatedMatchersOnAbsentAttributes(t *testing.T) {
	s := shared(t)
	runDecisions(t, s, []decisionCase{
		{"notPrincipals [*]: control, with a peer", check{dst: "neg-peer", src: webID}, allow},
		{"notPrincipals [*]: no peer identity", check{dst: "neg-peer"}, deny},
		{"notNamespaces [a, b]: control, listed namespace", check{dst: "neg-ns", src: webID}, allow},
		{"notNamespaces [a, b]: other namespace", check{dst: "neg-ns", src: td + "/ns/other/sa/x"}, deny},
		{"notNamespaces [a, b]: no peer identity", check{dst: "neg-ns"}, deny},
		{"header notValues: control, listed value", check{dst: "neg-header", src: webID, headers: map[string]string{"x-api-key": "key-2"}}, allow},
		{"header notValues: other value", check{dst: "neg-header", src: webID, headers: map[string]string{"x-api-key": "nope"}}, deny},
		{"header notValues: header absent", check{dst: "neg-header", src: webID}, deny},
		{"sni notValues: control, listed suffix", check{dst: "neg-sni", src: webID, sni: "www.example.com"}, allow},
		{"sni notValues: other SNI", check{dst: "neg-sni", src: webID, sni: "evil.example.net"}, deny},
		{"sni notValues: no SNI", check{dst: "neg-sni", src: webID}, deny},
	})
}
