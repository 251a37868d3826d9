// Package backoff computes capped exponential retry delays with jitter, for
// the agent's calls to the CA, so that a fleet of agents does not retry in
// step when the CA comes back.
package backoff

import (
	"math/rand/v2"
	"time"
)

// Defaults for a zero Backoff.
const (
	DefaultInitial = time.Second
	DefaultMax     = time.Minute
)

// Backoff yields delays that double from Initial up to Max. Each delay is
// drawn uniformly from the upper half of the current step, [d/2, d]. The
// zero value uses the defaults. It is not safe for concurrent use.
type Backoff struct {
	Initial time.Duration
	Max     time.Duration

	step time.Duration
}

// Next returns the next delay.
func (b *Backoff) Next() time.Duration {
	initial, limit := b.Initial, b.Max
	if initial <= 0 {
		initial = DefaultInitial
	}
	if limit <= 0 {
		limit = DefaultMax
	}
	if b.step == 0 {
		b.step = initial
	}
	d := min(b.step, limit)
	b.step = min(2*b.step, limit)
	return d/2 + rand.N(d/2+1)
}

// Reset starts again from Initial.
func (b *Backoff) Reset() { b.step = 0 }
