package engine_test

import (
	"runtime"
	"time"

	"golang.org/x/sys/unix"
)

// onThreadCPU returns the CPU time fn spent on its thread: unlike the wall
// clock, it does not grow when other processes hold the machine's cores.
func onThreadCPU(fn func()) time.Duration {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	before, after := threadCPU(), time.Duration(0)
	fn()
	after = threadCPU()
	return after - before
}

func threadCPU() time.Duration {
	var ru unix.Rusage
	if err := unix.Getrusage(unix.RUSAGE_THREAD, &ru); err != nil {
		panic(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}
