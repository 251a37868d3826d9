package adversary

import (
	"bytes"
	"encoding/json"
	"testing"
)

// TestMalformedPeerIDs: a peer whose certificate names a SPIFFE ID with a
// control character (BoringSSL, and so Envoy, accepts any byte in a URI
// SAN; a federated trust domain's CA may issue one) never slips past a
// DENY on its namespace or service account. Istio's regexps for those
// fields stop at a newline, while the ID's parts read namespace banned;
// trustmesh denies every such peer before evaluating any policy, in every
// namespace, and logs why.
func TestMalformedPeerIDs(t *testing.T) {
	s := shared(t)
	const banned = "cluster.local/ns/banned/sa/intruder"
	attacks := map[string]string{
		"newline in the trust domain":     "spiffe://cluster.lo\ncal/ns/banned/sa/intruder",
		"newline after the trust domain":  "spiffe://cluster.local\n/ns/banned/sa/intruder",
		"newline at the start":            "spiffe://\n" + banned,
		"newline at the end":              "spiffe://" + banned + "\n",
		"newline after the namespace":     "spiffe://cluster.local/ns/banned\n/sa/intruder",
		"carriage return":                 "spiffe://cluster.lo\rcal/ns/banned/sa/intruder",
		"NUL":                             "spiffe://cluster.local\x00/ns/banned/sa/intruder",
		"tab":                             "spiffe://cluster.local/ns/banned/sa/intruder\t",
		"line separator U+2028":           "spiffe://cluster.local\u2028/ns/banned/sa/intruder",
		"percent-encoded newline":         "spiffe://cluster.lo%0acal/ns/banned/sa/intruder",
		"upper-case trust domain":         "spiffe://CLUSTER.local/ns/banned/sa/intruder",
		"not a SPIFFE ID: a DN":           "CN=intruder,OU=banned",
		"not a SPIFFE ID: another scheme": "https://cluster.local/ns/banned/sa/intruder",
	}
	var cases []decisionCase
	for _, ns := range []string{"peer-ns", "peer-sa", "peer-open"} {
		cases = append(cases,
			decisionCase{ns + ": control, a workload of another namespace", check{dst: ns, src: webID}, allow},
			decisionCase{ns + ": control, no peer identity", check{dst: ns}, allow},
		)
		if ns != "peer-open" {
			cases = append(cases, decisionCase{ns + ": control, the banned workload", check{dst: ns, src: "spiffe://" + banned}, deny})
		}
		for name, id := range attacks {
			cases = append(cases, decisionCase{ns + ": " + name, check{dst: ns, src: id}, deny})
		}
	}
	runDecisions(t, s, cases)

	// The decision log says why, on one line, with the ID escaped.
	m := marker()
	s.decide(t, check{dst: "peer-ns", src: attacks["newline in the trust domain"], path: "/" + m})
	lines := s.decisionLines(t, m)
	if len(lines) != 1 {
		t.Fatalf("%d decision-log lines hold the marker, want 1", len(lines))
	}
	var e struct {
		Allowed bool   `json:"allowed"`
		Reason  string `json:"reason"`
		Error   string `json:"error"`
		Source  struct {
			Principal string `json:"principal"`
		} `json:"source"`
	}
	if err := json.Unmarshal(lines[0], &e); err != nil {
		t.Fatalf("decision-log line %s: %v", lines[0], err)
	}
	if e.Allowed || e.Reason != "peer identity rejected" || e.Source.Principal != attacks["newline in the trust domain"] ||
		!bytes.Contains([]byte(e.Error), []byte("not a well-formed SPIFFE ID")) {
		t.Errorf("decision-log line %s: want a denial, reason \"peer identity rejected\", the principal and the error", lines[0])
	}
}
