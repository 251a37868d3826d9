package backoff

import (
	"testing"
	"time"
)

func TestNextDoublesAndCaps(t *testing.T) {
	b := Backoff{Initial: time.Second, Max: 10 * time.Second}
	steps := []time.Duration{1, 2, 4, 8, 10, 10}
	for round := range 2 {
		for i, s := range steps {
			step := s * time.Second
			d := b.Next()
			if d < step/2 || d > step {
				t.Fatalf("round %d delay %d = %s, want in [%s, %s]", round, i, d, step/2, step)
			}
		}
		b.Reset()
	}
}

func TestZeroValueUsesDefaults(t *testing.T) {
	var b Backoff
	if d := b.Next(); d < DefaultInitial/2 || d > DefaultInitial {
		t.Fatalf("first delay %s, want within the default initial step %s", d, DefaultInitial)
	}
	for range 20 {
		if d := b.Next(); d > DefaultMax {
			t.Fatalf("delay %s exceeds default max %s", d, DefaultMax)
		}
	}
}
