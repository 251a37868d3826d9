//go:build !race

package symbolic_test

// raceEnabled says the race detector is on: the slow, single-goroutine
// tests then check a deterministic sample (everyNth).
const raceEnabled = false
