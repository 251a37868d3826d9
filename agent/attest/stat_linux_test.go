//go:build linux

package attest

import (
	"testing"
	"time"
)

func TestStartedBefore(t *testing.T) {
	tests := []struct {
		name  string
		start uint64        // ticks after boot
		at    time.Duration // boot time of the handshake
		want  bool
	}{
		{"long before", 100, 50 * time.Second, true},
		{"in the handshake's tick", 5000, 50*time.Second + 9*time.Millisecond, true},
		{"the tick the handshake began", 5000, 50 * time.Second, true},
		{"the next tick: a reused PID", 5001, 50*time.Second + 9*time.Millisecond, false},
		{"much later", 9000, 50 * time.Second, false},
		{"at boot", 0, 0, true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if got := startedBefore(tc.start, 100, tc.at); got != tc.want {
				t.Fatalf("startedBefore(%d, 100, %v) = %v, want %v", tc.start, tc.at, got, tc.want)
			}
		})
	}
}

func TestParseStat(t *testing.T) {
	tests := []struct {
		name    string
		in      string
		state   byte
		start   uint64
		wantErr bool
	}{
		{name: "plain", state: 'S', start: 4242,
			in: "1234 (sleep) S 1 1234 1234 0 -1 4194304 100 0 0 0 0 0 0 0 20 0 1 0 4242 2244608 128 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0\n"},
		{name: "name with spaces and parens", state: 'Z', start: 77,
			in: "99 (a) b (c) Z 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 77 0 0 0\n"},
		{name: "truncated", wantErr: true, in: "99 (x) S 1 2 3\n"},
		{name: "no command", wantErr: true, in: "99 x S 1\n"},
		{name: "bad start", wantErr: true, in: "1 (x) S 1 1 1 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 -5 0\n"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, err := parseStat([]byte(tc.in))
			if tc.wantErr {
				if err == nil {
					t.Fatalf("parseStat = %+v, want an error", st)
				}
				return
			}
			if err != nil || st.state != tc.state || st.start != tc.start {
				t.Fatalf("parseStat = %c %d %v, want %c %d", st.state, st.start, err, tc.state, tc.start)
			}
		})
	}
}
