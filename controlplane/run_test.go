package controlplane

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/internal/run"
)

// TestRunStopsOnAPanickingPart: a part of the control plane that panics
// stops the others, and Run returns the panic as an error instead of
// taking the process down.
func TestRunStopsOnAPanickingPart(t *testing.T) {
	cp, err := New(context.Background(), Config{
		DataDir:    t.TempDir(),
		Listen:     ListenConfig{CA: "127.0.0.1:0", Monitoring: "127.0.0.1:0", Authz: "off"},
		Kubernetes: KubernetesConfig{Mode: KubernetesOff},
		Log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	cp.bundleFns = append(cp.bundleFns, func(context.Context) error { panic("a part fails") })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = cp.Run(ctx)
	var pe *run.PanicError
	if !errors.As(err, &pe) || pe.Value != "a part fails" {
		t.Fatalf("Run = %v, want the part's panic", err)
	}
	if ctx.Err() != nil {
		t.Fatal("Run returned only when its context ended")
	}
}
