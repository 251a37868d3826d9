package run

import (
	"context"
	"errors"
	"strings"
	"sync/atomic"
	"testing"
	"time"
)

// blocker waits for its context to end and reports the cause it saw.
func blocker(saw chan<- error) Task {
	return func(ctx context.Context) error {
		<-ctx.Done()
		saw <- context.Cause(ctx)
		return errors.New("stopped") // a consequence, not a cause
	}
}

func panicky(ctx context.Context) error { panic("boom") }

func TestPanicBecomesErrorAndCancelsSiblings(t *testing.T) {
	saw := make(chan error, 2)
	err := Tasks(context.Background(), blocker(saw), panicky, blocker(saw))
	var pe *PanicError
	if !errors.As(err, &pe) {
		t.Fatalf("Tasks = %v, want a *PanicError", err)
	}
	if pe.Value != "boom" {
		t.Errorf("panic value = %v, want boom", pe.Value)
	}
	if !strings.Contains(string(pe.Stack), "run.panicky") {
		t.Errorf("stack does not name the panicking task:\n%s", pe.Stack)
	}
	for range 2 {
		if cause := <-saw; !errors.As(cause, &pe) {
			t.Errorf("sibling was cancelled with cause %v, want the panic", cause)
		}
	}
}

func TestPanicWithErrorUnwraps(t *testing.T) {
	sentinel := errors.New("sentinel")
	err := Tasks(context.Background(), func(context.Context) error { panic(sentinel) })
	if !errors.Is(err, sentinel) {
		t.Errorf("Tasks = %v, want it to wrap the panicked error", err)
	}
}

func TestFirstCauseWins(t *testing.T) {
	first := errors.New("first")
	saw := make(chan error, 1)
	err := Tasks(context.Background(),
		blocker(saw),
		func(context.Context) error { return first },
	)
	if err != first {
		t.Errorf("Tasks = %v, want %v, not the sibling's stopping error", err, first)
	}
	if cause := <-saw; cause != first {
		t.Errorf("sibling saw cause %v, want %v", cause, first)
	}
}

func TestCallerCancelIsTheCause(t *testing.T) {
	for _, tc := range []struct {
		name string
		task Task
	}{
		{"tasks return nil", func(ctx context.Context) error { <-ctx.Done(); return nil }},
		{"tasks return their own error", func(ctx context.Context) error { <-ctx.Done(); return errors.New("listener closed") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithCancel(context.Background())
			time.AfterFunc(10*time.Millisecond, cancel)
			if err := Tasks(ctx, tc.task, tc.task); err != context.Canceled {
				t.Errorf("Tasks = %v, want context.Canceled", err)
			}
		})
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	ran := false
	if err := Tasks(ctx, func(context.Context) error { ran = true; return errors.New("late") }); err != context.Canceled {
		t.Errorf("Tasks on an ended ctx = %v, want context.Canceled", err)
	}
	if !ran {
		t.Error("task did not run")
	}
}

// A panic while stopping is still reported: it is no consequence of the
// cancellation.
func TestPanicDuringShutdownIsNotHidden(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	time.AfterFunc(10*time.Millisecond, cancel)
	err := Tasks(ctx,
		func(ctx context.Context) error { <-ctx.Done(); return ctx.Err() },
		func(ctx context.Context) error { <-ctx.Done(); panic("stop failed") },
	)
	var pe *PanicError
	if !errors.As(err, &pe) || pe.Value != "stop failed" {
		t.Errorf("Tasks = %v, want the panic", err)
	}
}

func TestNilReturnStopsNobody(t *testing.T) {
	done := make(chan struct{})
	err := Tasks(context.Background(),
		func(context.Context) error { close(done); return nil },
		func(ctx context.Context) error {
			<-done
			select {
			case <-ctx.Done():
				return errors.New("cancelled by a sibling that returned nil")
			case <-time.After(20 * time.Millisecond):
				return nil
			}
		},
	)
	if err != nil {
		t.Errorf("Tasks = %v, want nil", err)
	}
	if err := Tasks(context.Background()); err != nil {
		t.Errorf("Tasks() = %v, want nil", err)
	}
}

func TestAllTasksReturnBeforeTasks(t *testing.T) {
	var stopped atomic.Int32
	slowStop := func(ctx context.Context) error {
		<-ctx.Done()
		time.Sleep(20 * time.Millisecond)
		stopped.Add(1)
		return nil
	}
	err := Tasks(context.Background(), slowStop, slowStop, panicky, slowStop)
	if err == nil {
		t.Fatal("Tasks = nil, want the panic")
	}
	if n := stopped.Load(); n != 3 {
		t.Errorf("Tasks returned with %d of 3 siblings stopped", n)
	}
}
