//go:build !race

package admission_test

// raceEnabled says the race detector is on: the slow, single-goroutine
// consistency test then checks a deterministic sample.
const raceEnabled = false
