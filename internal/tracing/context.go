package tracing

import (
	"context"

	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/metadata"
)

// w3c is the W3C trace context format, traceparent and tracestate. The
// servers extract with it directly rather than through the global
// propagator, so that what a caller may send does not depend on what a
// library set globally.
var w3c = propagation.TraceContext{}

// metadataCarrier reads gRPC metadata as otelgrpc does: keys are lower
// case, and a key with several values yields its first.
type metadataCarrier metadata.MD

func (c metadataCarrier) Get(key string) string {
	if v := metadata.MD(c).Get(key); len(v) > 0 {
		return v[0]
	}
	return ""
}

func (c metadataCarrier) Set(key, value string) { metadata.MD(c).Set(key, value) }

func (c metadataCarrier) Keys() []string {
	out := make([]string, 0, len(c))
	for k := range c {
		out = append(out, k)
	}
	return out
}

// FromIncomingGRPC returns ctx with the remote span context the caller put
// in the call's gRPC metadata (traceparent, tracestate), if it sent a valid
// one, and whether it did.
func FromIncomingGRPC(ctx context.Context) (context.Context, bool) {
	md, ok := metadata.FromIncomingContext(ctx)
	if !ok {
		return ctx, false
	}
	return extract(ctx, metadataCarrier(md))
}

// FromHeaders returns ctx with the remote span context in a request's HTTP
// headers (keys in lower case, as Envoy's CheckRequest has them), if they
// carry a valid one, and whether they did.
func FromHeaders(ctx context.Context, headers map[string]string) (context.Context, bool) {
	if headers == nil {
		return ctx, false
	}
	return extract(ctx, propagation.MapCarrier(headers))
}

func extract(ctx context.Context, c propagation.TextMapCarrier) (context.Context, bool) {
	sc := trace.SpanContextFromContext(w3c.Extract(context.Background(), c))
	if !sc.IsValid() {
		return ctx, false
	}
	return trace.ContextWithRemoteSpanContext(ctx, sc), true
}

// InjectOutgoingGRPC adds ctx's span context to the outgoing gRPC metadata,
// for clients that call trustmesh's servers (and tests that stand in for
// Envoy).
func InjectOutgoingGRPC(ctx context.Context) context.Context {
	md, ok := metadata.FromOutgoingContext(ctx)
	if ok {
		md = md.Copy()
	} else {
		md = metadata.MD{}
	}
	w3c.Inject(ctx, metadataCarrier(md))
	return metadata.NewOutgoingContext(ctx, md)
}

// noSpan is a span that records nothing; ending it does nothing.
var noSpan = trace.SpanFromContext(context.Background())

// Child starts a span under ctx's span, from the tracer named tracer of the
// parent's own provider, when the parent is recording. Otherwise it starts
// nothing and allocates nothing: it returns ctx and a span that records
// nothing. Components that are only ever called under a traced server
// span (signing, the journal's commit) trace this way, with no provider
// of their own.
func Child(ctx context.Context, tracer, name string, opts ...trace.SpanStartOption) (context.Context, trace.Span) {
	parent := trace.SpanFromContext(ctx)
	if !parent.IsRecording() {
		return ctx, noSpan
	}
	return parent.TracerProvider().Tracer(tracer).Start(ctx, name, opts...)
}
