package controlplane

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"log/slog"
	"os"
	"sync/atomic"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/leaderelection"
	"k8s.io/client-go/tools/leaderelection/resourcelock"
)

// elector elects one replica, through a Kubernetes Lease, to run singleton
// work such as CA rotation.
type elector struct {
	cfg    leaderelection.LeaderElectionConfig
	leader atomic.Bool
	log    *slog.Logger
}

func newElector(client kubernetes.Interface, namespace, lease string, log *slog.Logger) (*elector, error) {
	host, _ := os.Hostname()
	b := make([]byte, 4)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	e := &elector{log: log}
	e.cfg = leaderelection.LeaderElectionConfig{
		Lock: &resourcelock.LeaseLock{
			LeaseMeta:  metav1.ObjectMeta{Namespace: namespace, Name: lease},
			Client:     client.CoordinationV1(),
			LockConfig: resourcelock.ResourceLockConfig{Identity: host + "-" + hex.EncodeToString(b)},
		},
		LeaseDuration:   15 * time.Second,
		RenewDeadline:   10 * time.Second,
		RetryPeriod:     2 * time.Second,
		ReleaseOnCancel: true,
		Name:            lease,
		Callbacks: leaderelection.LeaderCallbacks{
			OnStartedLeading: func(context.Context) {
				e.leader.Store(true)
				log.Info("became the leader", "lease", namespace+"/"+lease)
			},
			OnStoppedLeading: func() {
				e.leader.Store(false)
				log.Info("stopped leading", "lease", namespace+"/"+lease)
			},
		},
	}
	return e, nil
}

// IsLeader reports whether this replica holds the lease.
func (e *elector) IsLeader() bool { return e.leader.Load() }

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
