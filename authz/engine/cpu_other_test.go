//go:build !linux

package engine_test

import "time"

// onThreadCPU falls back to the wall clock where the thread's CPU time
// cannot be read.
func onThreadCPU(fn func()) time.Duration {
	start := time.Now()
	fn()
	return time.Since(start)
}
