package watch

import (
	"time"

	"k8s.io/utils/clock"
)

// Settle debounces changes on an injected clock: its channel fires once
// changes have stopped for the quiet period, so that a burst of events (an
// editor's write and rename, a file caught half-written) is read once.
// It is not safe for concurrent use: one loop kicks it and selects on C.
type Settle struct {
	clock clock.WithTicker
	quiet time.Duration
	timer clock.Timer
}

// NewSettle returns a Settle with nothing pending.
func NewSettle(c clock.WithTicker, quiet time.Duration) *Settle {
	return &Settle{clock: c, quiet: quiet}
}

// Kick records a change: the quiet period starts again.
func (s *Settle) Kick() {
	if s.timer != nil {
		s.timer.Stop()
	}
	s.timer = s.clock.NewTimer(s.quiet)
}

// C fires once the quiet period has passed since the last Kick. It is nil,
// and blocks a select forever, while nothing is pending; after it fires,
// nothing is pending until the next Kick.
func (s *Settle) C() <-chan time.Time {
	if s.timer == nil {
		return nil
	}
	return s.timer.C()
}

// Fired marks the pending period as handled; call it after receiving from C.
func (s *Settle) Fired() { s.timer = nil }

// Stop drops a pending period.
func (s *Settle) Stop() {
	if s.timer != nil {
		s.timer.Stop()
		s.timer = nil
	}
}
