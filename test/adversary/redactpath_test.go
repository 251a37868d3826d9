package adversary

import (
	"bytes"
	"testing"
)

// TestDecisionLogRedactPath (class 9): --log-redact-path takes what it
// matches out of the paths in the decision log.
func TestDecisionLogRedactPath(t *testing.T) {
	s := start(t, serveConfig{policies: map[string][]byte{"hosts.yaml": policyFiles["hosts.yaml"]},
		args: []string{"--log-redact-path", "sess-[0-9a-f]+", "--log-redact-path", "/reset/[^/]+"}})
	m1, m2 := marker(), marker()
	s.decide(t, check{dst: "shop", src: webID, path: "/users/sess-0123abcd/" + m1})
	s.decide(t, check{dst: "hosts", src: webID, host: "admin.example.com", path: "/reset/SECRETRESET/" + m2}) // a denial
	for _, l := range s.decisionLines(t, m1, m2) {
		for _, secret := range []string{"sess-0123abcd", "SECRETRESET"} {
			if bytes.Contains(l, []byte(secret)) {
				t.Errorf("the decision log holds %s: %s", secret, l)
			}
		}
	}
}
