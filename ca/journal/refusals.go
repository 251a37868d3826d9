package journal

import (
	"context"
	"log/slog"
	"sync"
	"time"

	"k8s.io/utils/clock"
)

// RefusalAppender is where aggregated refusals are written.
type RefusalAppender interface {
	AppendRefusals(ctx context.Context, refusals []Refusal) error
}

// RefusalLogConfig configures a RefusalLog.
type RefusalLogConfig struct {
	Appender RefusalAppender
	Clock    clock.WithTicker
	Log      *slog.Logger
	// Interval is how often aggregated refusals are written. Default 5s.
	Interval time.Duration
	// MaxKeys bounds how many distinct (reason, method, caller, identity)
	// groups are held between writes, so at most MaxKeys+1 rows are written
	// per interval however hard the CA is flooded. Refusals beyond it are
	// counted in one overflow record. Default 128.
	MaxKeys int
}

// RefusalLog records refusals off the request path. Record never blocks:
// refusals are aggregated in memory by (reason, method, caller, identity),
// bounded in size, and written in one transaction per interval. A flood of
// refusals therefore costs one row per distinct group per interval.
type RefusalLog struct {
	cfg RefusalLogConfig

	mu       sync.Mutex
	pending  map[refusalKey]*Refusal
	overflow *Refusal
}

type refusalKey struct{ reason, method, caller, spiffeID string }

// OverflowReason is the reason of the record that counts refusals which did
// not fit in the aggregation table.
const OverflowReason = "overflow"

// NewRefusalLog returns a RefusalLog; call Run to write its records.
func NewRefusalLog(cfg RefusalLogConfig) *RefusalLog {
	if cfg.Interval <= 0 {
		cfg.Interval = 5 * time.Second
	}
	if cfg.MaxKeys <= 0 {
		cfg.MaxKeys = 128
	}
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	return &RefusalLog{cfg: cfg, pending: map[refusalKey]*Refusal{}}
}

// Record adds one refusal. It never blocks on storage.
func (l *RefusalLog) Record(at time.Time, reason, method, caller, spiffeID string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	k := refusalKey{reason, method, caller, spiffeID}
	r, ok := l.pending[k]
	if !ok {
		if len(l.pending) >= l.cfg.MaxKeys {
			if l.overflow == nil {
				l.overflow = &Refusal{First: at, Reason: OverflowReason}
			}
			l.overflow.Last = at
			l.overflow.Count++
			return
		}
		r = &Refusal{First: at, Reason: reason, Method: method, Caller: caller, SPIFFEID: spiffeID}
		l.pending[k] = r
	}
	r.Last = at
	r.Count++
}

// Flush writes what has been aggregated so far. On a write error the records
// are kept and merged into the next write.
func (l *RefusalLog) Flush(ctx context.Context) error {
	l.mu.Lock()
	batch := make([]Refusal, 0, len(l.pending)+1)
	for _, r := range l.pending {
		batch = append(batch, *r)
	}
	if l.overflow != nil {
		batch = append(batch, *l.overflow)
	}
	pending, overflow := l.pending, l.overflow
	l.pending, l.overflow = map[refusalKey]*Refusal{}, nil
	l.mu.Unlock()
	if len(batch) == 0 {
		return nil
	}
	if err := l.cfg.Appender.AppendRefusals(ctx, batch); err != nil {
		l.requeue(pending, overflow)
		return err
	}
	return nil
}

func (l *RefusalLog) requeue(pending map[refusalKey]*Refusal, overflow *Refusal) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for k, old := range pending {
		if cur, ok := l.pending[k]; ok {
			cur.First, cur.Count = old.First, cur.Count+old.Count
			continue
		}
		if len(l.pending) >= l.cfg.MaxKeys {
			overflow = mergeOverflow(overflow, old)
			continue
		}
		l.pending[k] = old
	}
	if overflow != nil {
		l.overflow = mergeOverflow(l.overflow, overflow)
	}
}

func mergeOverflow(into, r *Refusal) *Refusal {
	if into == nil {
		return &Refusal{First: r.First, Last: r.Last, Reason: OverflowReason, Count: r.Count}
	}
	if r.First.Before(into.First) {
		into.First = r.First
	}
	if r.Last.After(into.Last) {
		into.Last = r.Last
	}
	into.Count += r.Count
	return into
}

// Run writes aggregated refusals every interval until ctx ends, then writes
// what is left.
func (l *RefusalLog) Run(ctx context.Context) error {
	t := l.cfg.Clock.NewTicker(l.cfg.Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			// Write the rest with a short deadline of its own.
			fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
			defer cancel()
			if err := l.Flush(fctx); err != nil {
				l.cfg.Log.Error("could not record refusals at shutdown", "error", err)
			}
			return nil
		case <-t.C():
			if err := l.Flush(ctx); err != nil {
				l.cfg.Log.Error("could not record refusals; will retry", "error", err)
			}
		}
	}
}
