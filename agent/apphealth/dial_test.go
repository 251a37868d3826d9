package apphealth

import (
	"context"
	"net"
	"testing"
)

// TestDialOnly checks the last line of defence: whatever a probe's client
// is told, its dialer reaches only the probe's own address.
func TestDialOnly(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer lis.Close()
	_, port, _ := net.SplitHostPort(lis.Addr().String())
	own := net.JoinHostPort(host, port)
	dial := dialOnly(own)
	for _, tc := range []struct{ network, addr string }{
		{"tcp", lis.Addr().String()},
		{"tcp", "localhost:1"},
		{"tcp4", own},
		{"udp", own},
	} {
		if conn, err := dial(context.Background(), tc.network, tc.addr); err == nil {
			conn.Close()
			t.Errorf("dialled %s %s; only tcp %s is allowed", tc.network, tc.addr, own)
		}
	}
	conn, err := dial(context.Background(), "tcp", own)
	if err != nil {
		t.Fatalf("own address: %v", err)
	}
	conn.Close()
}
