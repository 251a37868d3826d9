package controlplane

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"sync"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
	"k8s.io/utils/clock"
)

// Leader-only work: automatic CA rotation (rotation.Config.IsLeader). Every
// other part of a replica serves whether or not it leads: issuance and
// renewal, the bundle, xDS, authorization, the webhooks, the trust-bundle
// ConfigMaps and the monitoring port.

// leaseTiming is the Lease's timing: a holder renews every RetryPeriod and
// gives up leading when it has not renewed for RenewDeadline; another
// replica takes the Lease once it has not seen it renewed for LeaseDuration.
type leaseTiming struct {
	LeaseDuration, RenewDeadline, RetryPeriod time.Duration
}

var defaultLeaseTiming = leaseTiming{LeaseDuration: 15 * time.Second, RenewDeadline: 10 * time.Second, RetryPeriod: 2 * time.Second}

// elector elects one replica, through a Kubernetes Lease, to run singleton
// work such as CA rotation.
//
// A replica leads while client-go says it does and, besides, only until
// RenewDeadline after its last successful renewal, measured here: client-go
// tells a holder it lost the Lease only once it has also tried to release
// it, which, with the apiserver unreachable rather than refusing, takes up
// to another RenewDeadline, past the moment another replica may take the
// Lease. It also starts its OnStartedLeading callback in a goroutine that
// may run after OnStoppedLeading; a term is therefore identified by the
// context client-go hands that callback, and is over once it is cancelled.
type elector struct {
	cfg    leaderelection.LeaderElectionConfig
	timing leaseTiming
	clock  clock.PassiveClock // client-go's leader election runs on real time
	log    *slog.Logger

	mu       sync.Mutex
	term     context.Context // the current term; nil when not leading
	renewed  time.Time       // when the last successful acquire or renewal was sent
	identity string
}

func newElector(client kubernetes.Interface, namespace, lease string, log *slog.Logger) (*elector, error) {
	host, _ := os.Hostname()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	lock := &resourcelock.LeaseLock{
		LeaseMeta:  metav1.ObjectMeta{Namespace: namespace, Name: lease},
		Client:     client.CoordinationV1(),
		LockConfig: resourcelock.ResourceLockConfig{Identity: host + "-" + hex.EncodeToString(b)},
	}
	return newElectorWithLock(lock, defaultLeaseTiming, clock.RealClock{}, log), nil
}

func newElectorWithLock(lock resourcelock.Interface, t leaseTiming, clk clock.PassiveClock, log *slog.Logger) *elector {
	e := &elector{timing: t, clock: clk, log: log, identity: lock.Identity()}
	desc := lock.Describe()
	e.cfg = leaderelection.LeaderElectionConfig{
		Lock:            &renewalLock{Interface: lock, e: e},
		LeaseDuration:   t.LeaseDuration,
		RenewDeadline:   t.RenewDeadline,
		RetryPeriod:     t.RetryPeriod,
		ReleaseOnCancel: true,
		Name:            desc,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(term context.Context) {
				e.mu.Lock()
				started := term.Err() == nil
				if started {
					e.term = term
				}
				e.mu.Unlock()
				if started {
					log.Info("became the leader", "lease", desc, "identity", e.identity)
				}
			},
			OnStoppedLeading: func() {
				e.mu.Lock()
				was := e.term != nil
				e.term = nil
				e.mu.Unlock()
				if was {
					log.Info("stopped leading; leader-only work (CA rotation) pauses", "lease", desc, "identity", e.identity)
				}
			},
		},
	}
	return e
}

// IsLeader reports whether this replica holds the lease: client-go's term
// has started and not ended, and the lease was renewed less than
// RenewDeadline ago.
func (e *elector) IsLeader() bool {
	now := e.clock.Now()
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.term != nil && e.term.Err() == nil && now.Sub(e.renewed) < e.timing.RenewDeadline
}

// Run campaigns for the lease until ctx ends, again after every loss.
func (e *elector) Run(ctx context.Context) error {
	le, err := leaderelection.NewLeaderElector(e.cfg)
	if err != nil {
		return fmt.Errorf("controlplane: leader election: %w", err)
	}
	for ctx.Err() == nil {
		le.Run(ctx)
	}
	return nil
}

// renewalLock notes when this replica last acquired or renewed the lease:
// the time the write was sent, which is no later than the renew time it
// carries and other replicas time the lease from.
type renewalLock struct {
	resourcelock.Interface
	e *elector
}

func (l *renewalLock) Create(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	return l.write(r, func() error { return l.Interface.Create(ctx, r) })
}

func (l *renewalLock) Update(ctx context.Context, r resourcelock.LeaderElectionRecord) error {
	return l.write(r, func() error { return l.Interface.Update(ctx, r) })
}

func (l *renewalLock) write(r resourcelock.LeaderElectionRecord, do func() error) error {
	sent := l.e.clock.Now()
	err := do()
	l.e.mu.Lock()
	defer l.e.mu.Unlock()
	switch {
	case r.HolderIdentity != l.e.identity:
		// A release: the lease is no longer this replica's.
		l.e.renewed = time.Time{}
	case err == nil && sent.After(l.e.renewed):
		l.e.renewed = sent
	}
	return err
}
