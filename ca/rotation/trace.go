package rotation

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
)

// TracerName is the tracer of the rotation's spans, the CA's.
const TracerName = "trustmesh/ca"

// The span of one rotation step and its attributes. rotation.step is the
// Action's name (prepare-intermediate, prepare-root, activate, retire);
// rotation.generation the generation prepared, or the one in force after
// activating or retiring.
const (
	SpanStep       = "ca.rotation.step"
	AttrStep       = "rotation.step"
	AttrGeneration = "rotation.generation"
)

// noSpan records nothing; ending it does nothing.
var noSpan = trace.SpanFromContext(context.Background())

// startStep starts the span of the step the policy decided; with tracing
// off it starts nothing. Journal appends under it (the rotation records)
// are its ca.journal.commit children.
func (m *Manager) startStep(ctx context.Context, a Action) (context.Context, trace.Span) {
	if m.tracer == nil {
		return ctx, noSpan
	}
	return m.tracer.Start(ctx, SpanStep, trace.WithAttributes(attribute.String(AttrStep, a.String())))
}

func endStep(span trace.Span, err error) {
	if err != nil {
		span.SetStatus(codes.Error, "step failed")
	}
	span.End()
}

// stepGeneration notes on the step's span, if one is recording, the
// generation the step concerns.
func stepGeneration(ctx context.Context, n int) {
	if span := trace.SpanFromContext(ctx); span.IsRecording() {
		span.SetAttributes(attribute.Int(AttrGeneration, n))
	}
}
