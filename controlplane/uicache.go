package controlplane

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/trustmesh/trustmesh/ca/audit"
	"github.com/trustmesh/trustmesh/ca/journal"
)

// uiViewSlots bounds the web UI's view computations in flight, across
// all views: a burst of reads queues for a slot instead of loading the
// CA's store and database in parallel.
const uiViewSlots = 2

// uiShared is what the UI's views share: the slots that bound their
// computations, and one incremental scan of the journal.
type uiShared struct {
	cp    *ControlPlane
	slots chan struct{}

	mu   sync.Mutex
	scan audit.Scanner
}

func newUIShared(cp *ControlPlane) *uiShared {
	return &uiShared{cp: cp, slots: make(chan struct{}, uiViewSlots)}
}

// journalScan reads the entries appended to the journal since the last
// call (not the whole journal again) and evaluates the rotation report at
// now. It returns the report, the CA rotation steps so far, and for each
// issuer's serial when the last certificate it signed expires.
func (sh *uiShared) journalScan(ctx context.Context, now time.Time) (*audit.RotationReport, []journal.Rotation, map[string]time.Time, error) {
	sh.mu.Lock()
	defer sh.mu.Unlock()
	if err := sh.scan.Update(ctx, sh.cp.journal); err != nil {
		return nil, nil, nil, fmt.Errorf("the journal: %w", err)
	}
	rots := append([]journal.Rotation(nil), sh.scan.Rotations()...)
	signed := map[string]time.Time{}
	for _, is := range sh.scan.Issuers() {
		signed[is] = sh.scan.SignedUntil(is)
	}
	return sh.scan.Report(nil, now, 0), rots, signed, nil
}

// viewCache keeps one view for its key (the journal's size and the
// second, the snapshots' versions): a request for the key in store gets
// it without any work, and concurrent requests for a key being computed
// share that one computation (a single flight). Computations take one of
// the shared slots.
type viewCache[K comparable, V any] struct {
	mu     sync.Mutex
	key    K
	val    V
	ok     bool
	flight *viewFlight[K, V]
}

type viewFlight[K comparable, V any] struct {
	key  K
	done chan struct{}
	val  V
	err  error
}

func (c *viewCache[K, V]) get(ctx context.Context, slots chan struct{}, key K, compute func(context.Context) (V, error)) (V, error) {
	c.mu.Lock()
	if c.ok && c.key == key {
		v := c.val
		c.mu.Unlock()
		return v, nil
	}
	if f := c.flight; f != nil && f.key == key {
		c.mu.Unlock()
		select {
		case <-f.done:
			return f.val, f.err
		case <-ctx.Done():
			var zero V
			return zero, ctx.Err()
		}
	}
	f := &viewFlight[K, V]{key: key, done: make(chan struct{})}
	c.flight = f
	c.mu.Unlock()

	select {
	case slots <- struct{}{}:
		// The computation is shared: one caller's going away must not
		// fail the others'.
		f.val, f.err = compute(context.WithoutCancel(ctx))
		<-slots
	case <-ctx.Done():
		f.err = ctx.Err()
	}
	c.mu.Lock()
	if f.err == nil {
		c.key, c.val, c.ok = key, f.val, true
	}
	if c.flight == f {
		c.flight = nil
	}
	c.mu.Unlock()
	close(f.done)
	return f.val, f.err
}

// journalKey keys the views read from the journal: they change when it
// grows, and with the time (statuses and "expires in" words), at most
// once a second.
type journalKey struct {
	size uint64
	at   time.Time
}

func (sh *uiShared) journalKey(ctx context.Context, now time.Time) (journalKey, error) {
	size, err := sh.cp.journal.Size(ctx)
	if err != nil {
		return journalKey{}, fmt.Errorf("the journal: %w", err)
	}
	return journalKey{size: size, at: now.Truncate(time.Second)}, nil
}
