package freeport

import (
	"net"
	"strconv"
	"testing"
)

// TestAddrIsBelowTheEphemeralRange: every address is a loopback port that
// is free, below the range the kernel picks ports from, and not handed
// out twice.
func TestAddrIsBelowTheEphemeralRange(t *testing.T) {
	first, err := ephemeralStart()
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for range 200 {
		a := Addr(t)
		host, port, err := net.SplitHostPort(a)
		if err != nil {
			t.Fatal(err)
		}
		p, _ := strconv.Atoi(port)
		if host != "127.0.0.1" || p < lowest || p >= first {
			t.Fatalf("%s: want 127.0.0.1 and a port in %d-%d", a, lowest, first-1)
		}
		if seen[a] {
			t.Fatalf("%s handed out twice", a)
		}
		seen[a] = true
		l, err := net.Listen("tcp", a)
		if err != nil {
			t.Fatalf("%s is not free: %v", a, err)
		}
		l.Close()
	}
}
