package agent

import (
	"context"
	"errors"
	"log/slog"
	"testing"

	supervisor "github.com/trustmesh/trustmesh/internal/run"
)

// A part that panics stops the agent with an error naming it, and its
// siblings are cancelled, instead of the panic killing the process.
func TestPartPanicStopsTheAgent(t *testing.T) {
	stopped := make(chan struct{})
	a := &assembled{log: slog.New(slog.DiscardHandler), parts: []part{
		{"sds", func(ctx context.Context) error { <-ctx.Done(); close(stopped); return ctx.Err() }},
		{"rotation", func(context.Context) error { panic("boom") }},
	}}
	err := a.run(context.Background())
	var pe *supervisor.PanicError
	if !errors.As(err, &pe) || pe.Value != "boom" {
		t.Fatalf("run = %v, want the rotation part's panic", err)
	}
	select {
	case <-stopped:
	default:
		t.Error("the sds part was still running when run returned")
	}
}
