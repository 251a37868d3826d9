// Package run is trustmesh's one supervisor: it runs long-lived tasks
// together, stops them all when one fails, and turns a panic in any of them
// into an error, as SPIRE's util.RunTasks does.
package run

import (
	"context"
	"errors"
	"fmt"
	"runtime/debug"
	"sync"
)

// Task is a long-running part: it runs until ctx ends or it fails.
type Task = func(ctx context.Context) error

// Tasks runs every task concurrently and returns once all of them have
// returned.
//
// The first task to return an error cancels the context of the others (its
// context.Cause is that error), and that error is what Tasks returns; errors
// the others return while stopping are consequences and are dropped. A task
// that returns nil has finished its work and stops nobody. A panic in a task
// is recovered into a *PanicError, which counts as that task's error.
//
// If ctx ends before any task fails, that is the cause: every task is
// cancelled and Tasks returns ctx.Err() (context.Canceled for a normal
// shutdown), whatever the tasks return, unless one panics: the first panic
// is returned even then. If every task returns nil while ctx is live, Tasks
// returns nil.
func Tasks(ctx context.Context, tasks ...Task) error {
	tctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	var (
		mu     sync.Mutex
		cause  error // the first error, or ctx's if it ended first
		ended  bool  // cause is ctx's end
		panick error // the first panic, which ctx's end does not hide
	)
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		var pe *PanicError
		isPanic := errors.As(err, &pe)
		if isPanic && panick == nil {
			panick = err
		}
		if cause == nil {
			// ctx's error is set before its children are cancelled, so a
			// task that fails because ctx ended finds it here.
			if ctx.Err() != nil && !isPanic {
				cause, ended = ctx.Err(), true
			} else {
				cause = err
			}
		}
		cancel(cause)
	}
	if ctx.Err() != nil {
		fail(ctx.Err())
	}
	var wg sync.WaitGroup
	for _, task := range tasks {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := call(tctx, task); err != nil {
				fail(err)
			}
		}()
	}
	wg.Wait()
	mu.Lock()
	defer mu.Unlock()
	switch {
	case ended && panick != nil:
		return panick
	case cause == nil && ctx.Err() != nil:
		return ctx.Err()
	}
	return cause
}

// PanicError is a task's panic, recovered.
type PanicError struct {
	Value any    // what the task panicked with
	Stack []byte // the panicking goroutine's stack
}

func (e *PanicError) Error() string {
	return fmt.Sprintf("run: task panicked: %v\n%s", e.Value, e.Stack)
}

// Unwrap returns the value the task panicked with if it is an error.
func (e *PanicError) Unwrap() error {
	err, _ := e.Value.(error)
	return err
}

func call(ctx context.Context, task Task) (err error) {
	defer func() {
		if r := recover(); r != nil {
			err = &PanicError{Value: r, Stack: debug.Stack()}
		}
	}()
	return task(ctx)
}

var _ error = (*PanicError)(nil)
