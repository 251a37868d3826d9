package controlplane

import (
	"context"
	"fmt"
	"io"
	"log/slog"
	"time"

	"go.opentelemetry.io/otel/trace"

	"github.com/trustmesh/trustmesh/internal/tracing"
)

// Tracing is OpenTelemetry tracing as the environment sets it up for
// trustmesh serve and trustmesh authz: on only when OTEL_TRACES_EXPORTER is
// otlp or console (internal/tracing says the rules).
type Tracing struct {
	// Provider goes into Config.TracerProvider (or the standalone
	// service's); nil when tracing is off.
	Provider trace.TracerProvider
	p        *tracing.Provider
}

// tracingFlushTimeout bounds the flush of spans at exit.
const tracingFlushTimeout = 5 * time.Second

// StartTracing sets tracing up from env (os.LookupEnv in the binary); the
// console exporter writes to console. A variable it cannot honour is an
// error, so that a start asked to trace does not silently run untraced.
func StartTracing(ctx context.Context, env func(string) (string, bool), console io.Writer) (*Tracing, error) {
	p, err := tracing.Setup(ctx, env, console)
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	return &Tracing{Provider: p.TracerProvider, p: p}, nil
}

// CheckTracing checks the tracing variables as StartTracing would, setting
// nothing up (for --validate).
func CheckTracing(env func(string) (string, bool)) error {
	if _, err := tracing.Parse(env); err != nil {
		return fmt.Errorf("controlplane: %w", err)
	}
	return nil
}

// Stop flushes the spans not yet exported, within tracingFlushTimeout, and
// logs a failure to log: at exit there is nobody else to tell.
func (t *Tracing) Stop(log *slog.Logger) {
	if t == nil || t.Provider == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), tracingFlushTimeout)
	defer cancel()
	if err := t.p.Shutdown(ctx); err != nil && log != nil {
		log.Warn("could not flush traces at exit", "error", err)
	}
}
