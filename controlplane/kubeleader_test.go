package controlplane

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"sync/atomic"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/utils/clock"
)

// unreachableLock is a Lease lock whose apiserver can be made unreachable
// as a network partition makes it: every call hangs for a while, then
// fails.
type unreachableLock struct {
	resourcelock.Interface
	cut  atomic.Bool
	hang time.Duration
}

func (l *unreachableLock) fail(ctx context.Context) error {
	select {
	case <-time.After(l.hang):
	case <-ctx.Done():
	}
	return errors.New("dial tcp: i/o timeout")
}

func (l *unreachableLock) Get(ctx context.Context) (*resourcelock.LeaderElectionRecord, []byte, error) {
	if l.cut.Load() {
		return nil, nil, l.fail(ctx)
	}
	return l.Interface.Get(ctx)
}

func (l *unreachableLock) Create(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	if l.cut.Load() {
		return l.fail(ctx)
	}
	return l.Interface.Create(ctx, r)
}

func (l *unreachableLock) Update(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	if l.cut.Load() {
		return l.fail(ctx)
	}
	return l.Interface.Update(ctx, r)
}

// TestLeaderCutOffStopsLeadingBeforeTheLeaseCanBeTaken: a leader cut off
// from the apiserver stops saying it leads (and so pauses CA rotation)
// within RenewDeadline of its last renewal, before another replica may take
// the Lease: at no moment do two replicas lead. client-go alone tells the
// leader only after its renewal attempts and its release attempt have each
// timed out, well after the other replica has taken over.
func TestLeaderCutOffStopsLeadingBeforeTheLeaseCanBeTaken(t *testing.T) {
	timing := leaseTiming{LeaseDuration: 3 * time.Second, RenewDeadline: 2 * time.Second, RetryPeriod: 250 * time.Millisecond}
	client := fake.NewClientset()
	log := slog.New(slog.NewTextHandler(io.Discard, nil))
	lock := func(id string) resourcelock.Interface {
		return &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: "trustmesh-system", Name: "trustmesh-ca-rotation"},
			Client:     client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: id},
		}
	}
	aLock := &unreachableLock{Interface: lock("a"), hang: 2 * timing.LeaseDuration}
	a := newElectorWithLock(aLock, timing, clock.RealClock{}, log)
	b := newElectorWithLock(lock("b"), timing, clock.RealClock{}, log)

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan struct{}, 2)
	run := func(e *elector) {
		go func() { _ = e.Run(ctx); done <- struct{}{} }()
	}
	defer func() { cancel(); <-done; <-done }()
	run(a)
	waitFor(t, 10*time.Second, "a leads", a.IsLeader)
	run(b)

	aLock.cut.Store(true)
	cut := time.Now()
	var lostAt time.Time
	deadline := cut.Add(3 * timing.LeaseDuration)
	for !b.IsLeader() {
		if a.IsLeader() && b.IsLeader() {
			t.Fatal("two leaders")
		}
		if lostAt.IsZero() && !a.IsLeader() {
			lostAt = time.Now()
		}
		if time.Now().After(deadline) {
			t.Fatalf("b did not take the lease within %s of a's cut (a leads: %v)", 3*timing.LeaseDuration, a.IsLeader())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if a.IsLeader() {
		t.Fatalf("b took the lease %s after a was cut off, and a still says it leads", time.Since(cut).Round(time.Millisecond))
	}
	if lostAt.IsZero() || lostAt.Sub(cut) > timing.RenewDeadline+timing.RetryPeriod {
		t.Fatalf("a stopped leading %s after it was cut off; want within RenewDeadline (%s)", lostAt.Sub(cut), timing.RenewDeadline)
	}
	// Reconnected, a follows: exactly one leader.
	aLock.cut.Store(false)
	for end := time.Now().Add(2 * timing.LeaseDuration); time.Now().Before(end); time.Sleep(20 * time.Millisecond) {
		if a.IsLeader() == b.IsLeader() {
			t.Fatalf("after a's return: a leads %v, b leads %v; want exactly one", a.IsLeader(), b.IsLeader())
		}
	}
}

// TestLeaderTermEndsWithItsContext: a term whose context client-go has
// cancelled is over, even when its OnStartedLeading callback, which
// client-go runs in a goroutine, comes after OnStoppedLeading.
func TestLeaderTermEndsWithItsContext(t *testing.T) {
	e := newElectorWithLock(&resourcelock.LeaseLock{LockConfig: resourcelock.ResourceLockConfig{Identity: "a"}},
		defaultLeaseTiming, clock.RealClock{}, slog.New(slog.NewTextHandler(io.Discard, nil)))
	e.renewed = time.Now()
	term, end := context.WithCancel(context.Background())
	e.cfg.Callbacks.OnStartedLeading(term)
	if !e.IsLeader() {
		t.Fatal("not leading in a live term renewed just now")
	}
	end()
	if e.IsLeader() {
		t.Fatal("leading after the term's context ended")
	}
	e.cfg.Callbacks.OnStoppedLeading()
	e.cfg.Callbacks.OnStartedLeading(term) // late, as client-go's goroutine may be
	if e.IsLeader() {
		t.Fatal("a late OnStartedLeading of an ended term made it leader")
	}
}

func waitFor(t *testing.T, within time.Duration, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(within)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, within)
		}
		time.Sleep(20 * time.Millisecond)
	}
}
