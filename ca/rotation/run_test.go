package rotation_test

import (
	"context"
	"sync/atomic"
	"testing"
	"time"

	"k8s.io/utils/clock"
	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/rotation"
)

// TestRunOnTheFakeClock drives Run with a fake clock's ticker, one tick at a
// time: the leader rotates on schedule and applies each change once; a
// replica that is not the leader takes no step of its own but still applies
// a change another process (trustmesh ca rotate) made; Run ends cleanly
// with its context.
func TestRunOnTheFakeClock(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	clk := &steppedClock{FakeClock: clocktesting.NewFakeClock(t0), ticks: make(chan time.Time)}
	store := rotation.DirStore{Dir: t.TempDir()}
	cfg := suiteConfig(store, clk.FakeClock, nil)
	cfg.Clock = clk
	cfg.Automatic = true
	var leader atomic.Bool
	leader.Store(true)
	// Each pass of the loop begins by asking whether it leads: there it
	// reports and waits for the test, which so runs one pass per tick.
	passes, resume := make(chan time.Time), make(chan struct{})
	cfg.IsLeader = func() bool { passes <- clk.Now(); <-resume; return leader.Load() }
	m, err := rotation.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	first, err := m.Initial(ctx)
	if err != nil {
		t.Fatal(err)
	}
	applied := make(chan *authority.Material, 100)
	done := make(chan error, 1)
	go func() { done <- m.Run(ctx, func(mat *authority.Material) { applied <- mat }) }()

	// stepTo runs the passes up to d, one tick at a time, and returns what
	// they applied. Between calls, the pass at the clock's time waits in
	// IsLeader: the clock moves only while no pass runs.
	stepTo := func(d time.Duration) []*authority.Material {
		t.Helper()
		for !clk.Now().After(t0.Add(d)) {
			resume <- struct{}{}     // run the waiting pass
			clk.ticks <- clk.Now()   // taken only once that pass is over
			<-passes                 // the next pass waits
			clk.Step(suite.Interval) // and will run a tick later
		}
		var out []*authority.Material
		for {
			select {
			case mat := <-applied:
				out = append(out, mat)
			default:
				return out
			}
		}
	}
	<-passes // the first pass, at t0
	sched := suite.Schedule(rotation.Active{Intermediate: rotation.Validity{NotBefore: first.Cert.NotBefore, NotAfter: first.Cert.NotAfter}})
	prepareAt, activateAt := sched.PrepareIntermediate.Sub(t0), sched.ActivateIntermediate.Sub(t0)
	if got := stepTo(prepareAt - time.Second); len(got) != 0 {
		st, _ := m.ReadState(ctx)
		t.Fatalf("applied %d changes before anything was due (now %s, state %+v)", len(got), clk.Now().Sub(t0), st)
	}
	// Prepared (the bundle's state changed), then activated.
	got := stepTo(activateAt + time.Second)
	if len(got) != 2 {
		t.Fatalf("applied %d changes by %s, want the preparation at %s and the activation at %s", len(got), activateAt+time.Second, prepareAt, activateAt)
	}
	if !got[0].Cert.Equal(first.Cert) || got[1].Cert.Equal(first.Cert) {
		t.Fatal("the intermediate in force changed at preparation, or did not at activation")
	}
	verifyMaterial(t, got[1], clk.Now())

	// Not the leader: no step of its own, though the next is due within
	// the active intermediate's first half.
	leader.Store(false)
	if got := stepTo(activateAt + got[1].Cert.NotAfter.Sub(got[1].Cert.NotBefore)/2 + 2*time.Second); len(got) != 0 {
		t.Fatalf("a replica that does not lead applied %d changes", len(got))
	}
	st, err := m.ReadState(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.Next != 0 {
		t.Fatalf("a replica that does not lead prepared generation %d", st.Next)
	}
	// Another process activates a CA: the next pass applies it.
	op, err := rotation.Open(rotation.Config{Store: store, TrustDomain: td, Clock: clk, Log: quiet})
	if err != nil {
		t.Fatal(err)
	}
	if err := op.Prepare(ctx, false); err != nil {
		t.Fatal(err)
	}
	if err := op.Activate(ctx, false); err != nil {
		t.Fatal(err)
	}
	got = stepTo(clk.Now().Sub(t0) + time.Second)
	if len(got) != 1 || got[0].Cert.Equal(got[0].Roots[0]) {
		t.Fatalf("applied %d changes after trustmesh ca rotate; want its CA", len(got))
	}
	if mat, _, err := op.Material(ctx, clk.Now()); err != nil || !mat.Cert.Equal(got[0].Cert) {
		t.Fatalf("applied a CA other than the one activated (%v)", err)
	}

	if clk.interval != suite.Interval {
		t.Fatalf("Run ticks every %s, want the interval %s", clk.interval, suite.Interval)
	}
	cancel()
	resume <- struct{}{} // the waiting pass ends the loop
	if err := <-done; err != nil {
		t.Fatalf("Run returned %v when its context ended, want nil", err)
	}
}

// steppedClock is a fake clock whose ticker ticks when the test sends on
// ticks: a send returns only once the loop waits for it, so the test knows
// the pass before it is over.
type steppedClock struct {
	*clocktesting.FakeClock
	ticks    chan time.Time
	interval time.Duration
}

func (c *steppedClock) NewTicker(d time.Duration) clock.Ticker {
	c.interval = d
	return tickerChan(c.ticks)
}

type tickerChan chan time.Time

func (t tickerChan) C() <-chan time.Time { return t }
func (tickerChan) Stop()                 {}
