package extauthz

import (
	"context"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc/metadata"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// fixed decides every check the same way, without allocating, so that
// what the benchmarks and the allocation test see is the server's own
// cost, tracing included.
type fixed struct{ d engine.Decision }

func (f *fixed) CheckInto(_ context.Context, _ *authv3.CheckRequest, d *engine.Decision) error {
	*d = f.d
	return nil
}

func benchRequest() *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/bar/sa/client", Address: &corev3.Address{
			Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1"}}}},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: "GET", Host: "web", Path: "/", Headers: map[string]string{":path": "/", "x-user": "alice"},
		}},
	}}
}

func newBenchServer(t testing.TB, tp *sdktrace.TracerProvider) *Server {
	rule := 0
	cfg := Config{Engine: &fixed{engine.Decision{Reason: engine.ReasonDenyMatched, Policy: "foo/deny", Rule: &rule, Action: "DENY", HTTPStatus: 403}},
		InsecurePlaintext: true}
	if tp != nil {
		cfg.TracerProvider = tp
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestCheckOffAllocatesNothingForTracing holds tracing-off Check to the
// allocations of the untraced decision itself: a bool checked once, no
// span, no context extraction.
func TestCheckOffAllocatesNothingForTracing(t *testing.T) {
	s := newBenchServer(t, nil)
	req := benchRequest()
	ctx := metadata.NewIncomingContext(context.Background(), metadata.Pairs("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
	var d engine.Decision
	base := testing.AllocsPerRun(200, func() { _, _ = s.check(ctx, req, &d) })
	got := testing.AllocsPerRun(200, func() { _, _ = s.Check(ctx, req) })
	if got != base {
		t.Fatalf("Check with tracing off allocates %v per call, the decision alone %v", got, base)
	}
	// The same measure sees tracing when it is on, so it can fail.
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	defer tp.Shutdown(context.Background())
	on := newBenchServer(t, tp)
	if traced := testing.AllocsPerRun(50, func() { _, _ = on.Check(ctx, req) }); traced <= base {
		t.Fatalf("traced Check allocates %v, no more than untraced %v: the measure is blind", traced, base)
	}
}

// BenchmarkCheck measures the server's Check around a decision that costs
// nothing: off, on with 1% of root traces sampled (parentbased_traceidratio
// 0.01, no caller context), and on with every call sampled into a batch
// processor whose exporter discards.
func BenchmarkCheck(b *testing.B) {
	req := benchRequest()
	for _, tc := range []struct {
		name string
		tp   func() *sdktrace.TracerProvider
	}{
		{"tracing=off", func() *sdktrace.TracerProvider { return nil }},
		{"tracing=1pct", func() *sdktrace.TracerProvider {
			return sdktrace.NewTracerProvider(sdktrace.WithSampler(sdktrace.ParentBased(sdktrace.TraceIDRatioBased(0.01))),
				sdktrace.WithBatcher(tracetest.NewNoopExporter()))
		}},
		{"tracing=all", func() *sdktrace.TracerProvider {
			return sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()))
		}},
	} {
		b.Run(tc.name, func(b *testing.B) {
			tp := tc.tp()
			if tp != nil {
				defer tp.Shutdown(context.Background())
			}
			s := newBenchServer(b, tp)
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			for b.Loop() {
				_, _ = s.Check(ctx, req)
			}
		})
	}
}
