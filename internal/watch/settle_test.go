package watch_test

import (
	"testing"
	"time"

	testclock "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/internal/watch"
)

// TestSettleFiresOnceAfterQuiet: a burst of kicks fires once, a quiet
// period after the last kick, on the injected clock.
func TestSettleFiresOnceAfterQuiet(t *testing.T) {
	clk := testclock.NewFakeClock(time.Unix(0, 0))
	s := watch.NewSettle(clk, time.Second)
	if s.C() != nil {
		t.Fatal("a new Settle has a pending period")
	}
	fired := func() bool {
		select {
		case <-s.C():
			s.Fired()
			return true
		default:
			return false
		}
	}
	s.Kick()
	clk.Step(600 * time.Millisecond)
	s.Kick() // the quiet period starts again
	clk.Step(600 * time.Millisecond)
	if fired() {
		t.Fatal("fired before a quiet period passed since the last kick")
	}
	clk.Step(400 * time.Millisecond)
	if !fired() {
		t.Fatal("did not fire a quiet period after the last kick")
	}
	if s.C() != nil {
		t.Fatal("still pending after it fired")
	}
	s.Kick()
	s.Stop()
	clk.Step(time.Hour)
	if s.C() != nil || clk.HasWaiters() {
		t.Fatal("a stopped Settle still has a pending period")
	}
}
