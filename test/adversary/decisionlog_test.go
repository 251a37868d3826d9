package adversary

import (
	"bytes"
	"crypto/rand"
	"encoding/hex"
	"os"
	"testing"
	"time"
)

func marker() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return "m" + hex.EncodeToString(b)
}

// decisionLines waits for every marker to appear in the server's decision
// log and returns the lines that hold one.
func (s *server) decisionLines(t *testing.T, markers ...string) [][]byte {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for {
		b, err := os.ReadFile(s.decisionLog)
		if err != nil && !os.IsNotExist(err) {
			t.Fatal(err)
		}
		var lines [][]byte
		found := 0
		for _, m := range markers {
			n := 0
			for _, l := range bytes.Split(b, []byte("\n")) {
				if bytes.Contains(l, []byte(m)) {
					lines = append(lines, l)
					n++
				}
			}
			if n > 0 {
				found++
			}
		}
		if found == len(markers) {
			return lines
		}
		if time.Now().After(deadline) {
			t.Fatalf("the decision log has %d of %d decisions after 15s", found, len(markers))
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// TestDecisionLogRedaction (class 9): secrets in a query string never
// reach the decision log, with or without a value.
func TestDecisionLogRedaction(t *testing.T) {
	s := shared(t)
	cases := []struct{ name, query string }{
		{"control: a parameter with a value", "?session=SECRETVALUE0"},
		{"a parameter with no value", "?SECRETTOKEN1"},
		{"a value-less parameter among others", "?a=1&SECRETTOKEN2&b=2"},
	}
	var markers []string
	for _, tc := range cases {
		m := marker()
		markers = append(markers, m)
		s.decide(t, check{dst: "shop", src: webID, path: "/redact/" + m + tc.query})
	}
	lines := s.decisionLines(t, markers...)
	for _, l := range lines {
		for _, secret := range []string{"SECRETVALUE", "SECRETTOKEN"} {
			if bytes.Contains(l, []byte(secret)) {
				t.Errorf("the decision log holds %s: %s", secret, l)
			}
		}
	}
}
