package decisionlog

import (
	"bytes"
	"context"
	"fmt"
	"testing"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// TestRecentKeepsTheLastDenialsRedacted: Run keeps the last denials, newest
// first, redacted as written, and no allowed decision; the ring is bounded.
func TestRecentKeepsTheLastDenialsRedacted(t *testing.T) {
	n := 0
	l, err := New(Config{Writer: &bytes.Buffer{}, RecentDenials: 3, NewID: func() string { n++; return fmt.Sprint("d", n) }})
	if err != nil {
		t.Fatal(err)
	}
	if got := l.Recent(10); len(got) != 0 {
		t.Fatalf("Recent before any decision = %v", got)
	}
	for i := range 5 {
		l.Log(httpReq(fmt.Sprintf("/p%d?token=s3cret", i), map[string]string{"authorization": "Bearer x"}), &engine.Decision{Allowed: false, Reason: "denied"})
		l.Log(httpReq("/allowed", nil), &engine.Decision{Allowed: true})
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := l.Run(ctx); err != nil { // writes what is queued, then returns
		t.Fatal(err)
	}
	got := l.Recent(0)
	if len(got) != 3 {
		t.Fatalf("Recent kept %d denials, want the ring's 3", len(got))
	}
	for i, want := range []string{"/p4?token=REDACTED", "/p3?token=REDACTED", "/p2?token=REDACTED"} {
		if got[i].Path != want || got[i].Allowed || got[i].Headers["authorization"] != Redacted {
			t.Errorf("Recent[%d] = %+v, want path %q, denied, headers redacted", i, got[i], want)
		}
	}
	if got := l.Recent(2); len(got) != 2 || got[0].Path != "/p4?token=REDACTED" {
		t.Errorf("Recent(2) = %+v", got)
	}
}

func TestRecentDenialsRefusesNegative(t *testing.T) {
	if _, err := New(Config{Writer: &bytes.Buffer{}, RecentDenials: -1}); err == nil {
		t.Fatal("a negative ring size was accepted")
	}
}
