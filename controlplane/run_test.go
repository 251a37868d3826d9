package controlplane

import (
	"context"
	"errors"
	"io"
	"log/slog"
	"net"
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

// A stop that cannot finish (a client holds the monitoring server in the
// middle of a request past the grace period) is an error, as it was before
// the parts ran under one supervisor, not a clean exit.
func TestRunReportsAnUncleanStop(t *testing.T) {
	cp, err := New(context.Background(), Config{
		DataDir:    t.TempDir(),
		Listen:     ListenConfig{CA: "127.0.0.1:0", Monitoring: "127.0.0.1:0", Authz: "off"},
		Kubernetes: KubernetesConfig{Mode: KubernetesOff},
		Log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if err != nil {
		t.Fatal(err)
	}
	cp.httpGrace = 200 * time.Millisecond
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- cp.Run(ctx) }()
	c, err := net.Dial("tcp", cp.Addrs().Monitoring.String())
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	// Half a request: the server reads it and waits for the rest, so the
	// connection is active, not idle, and Shutdown waits for it.
	if _, err := c.Write([]byte("GET /healthz HTTP/1.1\r\nHost: x\r\n")); err != nil {
		t.Fatal(err)
	}
	time.Sleep(200 * time.Millisecond)
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Fatalf("Run = %v, want the monitoring server's unfinished shutdown", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("Run did not return")
	}
}
