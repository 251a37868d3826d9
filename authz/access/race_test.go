//go:build race

package access_test

// raceEnabled says the race detector is on: the slow, single-goroutine
// soundness test then checks fewer policy sets.
const raceEnabled = true
