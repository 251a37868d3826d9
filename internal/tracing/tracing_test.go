package tracing

import (
	"bytes"
	"context"
	"errors"
	"slices"
	"strings"
	"testing"

	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/metadata"
)

func envOf(kv map[string]string) Lookup {
	return func(k string) (string, bool) {
		v, ok := kv[k]
		return v, ok
	}
}

func TestParse(t *testing.T) {
	for _, tc := range []struct {
		name      string
		env       map[string]string
		exporters []string
		protocol  string
		err       string // substring; empty means no error
	}{
		{name: "unset is off", env: nil},
		{name: "empty is off", env: map[string]string{EnvExporter: ""}},
		{name: "none is off", env: map[string]string{EnvExporter: "none"}},
		{name: "otlp defaults to http/protobuf", env: map[string]string{EnvExporter: "otlp"},
			exporters: []string{"otlp"}, protocol: ProtocolHTTP},
		{name: "otlp over grpc", env: map[string]string{EnvExporter: "otlp", EnvProtocol: "grpc"},
			exporters: []string{"otlp"}, protocol: ProtocolGRPC},
		{name: "otlp over http/protobuf", env: map[string]string{EnvExporter: "otlp", EnvProtocol: "http/protobuf"},
			exporters: []string{"otlp"}, protocol: ProtocolHTTP},
		{name: "the traces protocol wins over the general one",
			env:       map[string]string{EnvExporter: "otlp", EnvProtocol: "http/protobuf", EnvTracesProtocol: "grpc"},
			exporters: []string{"otlp"}, protocol: ProtocolGRPC},
		{name: "console", env: map[string]string{EnvExporter: "console"}, exporters: []string{"console"}},
		{name: "console ignores the protocol", env: map[string]string{EnvExporter: "console", EnvProtocol: "http/json"},
			exporters: []string{"console"}},
		{name: "a list", env: map[string]string{EnvExporter: "otlp, console"},
			exporters: []string{"otlp", "console"}, protocol: ProtocolHTTP},
		{name: "SDK disabled wins", env: map[string]string{EnvExporter: "otlp", EnvSDKDisabled: "true"}},
		{name: "SDK disabled in any case", env: map[string]string{EnvExporter: "otlp", EnvSDKDisabled: "TRUE"}},
		{name: "SDK disabled false keeps it on", env: map[string]string{EnvExporter: "otlp", EnvSDKDisabled: "false"},
			exporters: []string{"otlp"}, protocol: ProtocolHTTP},
		{name: "the protocol alone turns nothing on", env: map[string]string{EnvProtocol: "grpc"}},
		{name: "an unknown exporter is an error", env: map[string]string{EnvExporter: "jaeger"}, err: `unknown exporter "jaeger"`},
		{name: "none with an exporter is an error", env: map[string]string{EnvExporter: "none,otlp"}, err: "none cannot be combined"},
		{name: "http/json is not supported", env: map[string]string{EnvExporter: "otlp", EnvProtocol: "http/json"},
			err: EnvProtocol + `="http/json"`},
		{name: "a bad traces protocol names its variable", env: map[string]string{EnvExporter: "otlp", EnvTracesProtocol: "udp"},
			err: EnvTracesProtocol + `="udp"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Parse(envOf(tc.env))
			if tc.err != "" {
				if !errors.Is(err, ErrConfig) || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("error %v, want ErrConfig with %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !slices.Equal(s.Exporters, tc.exporters) || s.Protocol != tc.protocol {
				t.Errorf("got %+v, want exporters %v protocol %q", s, tc.exporters, tc.protocol)
			}
			if s.On() != (len(tc.exporters) > 0) {
				t.Errorf("On() = %v", s.On())
			}
		})
	}
}

func TestSetupOffChangesNothing(t *testing.T) {
	p, err := Setup(context.Background(), envOf(map[string]string{EnvExporter: "none"}), nil)
	if err != nil {
		t.Fatal(err)
	}
	if p.TracerProvider != nil {
		t.Fatal("tracing off must give no tracer provider")
	}
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if _, err := Setup(context.Background(), envOf(map[string]string{EnvExporter: "zipkin"}), nil); !errors.Is(err, ErrConfig) {
		t.Fatalf("unknown exporter: %v", err)
	}
}

func TestSetupConsoleFlushesOnShutdown(t *testing.T) {
	var out bytes.Buffer
	p, err := Setup(context.Background(), envOf(map[string]string{EnvExporter: "console", "OTEL_SERVICE_NAME": "ignored-by-lookup"}), &out)
	if err != nil {
		t.Fatal(err)
	}
	if p.TracerProvider == nil {
		t.Fatal("console must turn tracing on")
	}
	_, span := p.TracerProvider.Tracer("test").Start(context.Background(), "flushed-span")
	span.End()
	if err := p.Shutdown(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), `"flushed-span"`) {
		t.Fatalf("span not flushed at shutdown; console got %q", out.String())
	}
	if !strings.Contains(out.String(), `"trustmesh"`) {
		t.Errorf("service.name should default to trustmesh; console got %q", out.String())
	}
}

func TestExtract(t *testing.T) {
	const (
		tp      = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
		traceID = "0af7651916cd43dd8448eb211c80319c"
	)
	in := metadata.NewIncomingContext(context.Background(), metadata.Pairs("traceparent", tp))
	ctx, ok := FromIncomingGRPC(in)
	if sc := trace.SpanContextFromContext(ctx); !ok || sc.TraceID().String() != traceID || !sc.IsRemote() {
		t.Fatalf("from metadata: ok %v, span context %v", ok, sc)
	}
	bad := metadata.NewIncomingContext(context.Background(), metadata.Pairs("traceparent", "00-zz-b7ad6b7169203331-01"))
	if _, ok := FromIncomingGRPC(bad); ok {
		t.Error("a malformed traceparent was accepted")
	}
	if _, ok := FromIncomingGRPC(context.Background()); ok {
		t.Error("no metadata, yet a context")
	}
	ctx, ok = FromHeaders(context.Background(), map[string]string{"traceparent": tp, ":path": "/"})
	if sc := trace.SpanContextFromContext(ctx); !ok || sc.TraceID().String() != traceID {
		t.Fatalf("from headers: ok %v, span context %v", ok, sc)
	}
	if _, ok := FromHeaders(context.Background(), map[string]string{":path": "/"}); ok {
		t.Error("no traceparent header, yet a context")
	}
	// Round trip through outgoing metadata, as a client would send it.
	out := InjectOutgoingGRPC(ctx)
	md, _ := metadata.FromOutgoingContext(out)
	if got := md.Get("traceparent"); len(got) != 1 || got[0] != tp {
		t.Errorf("outgoing traceparent %v, want %s", got, tp)
	}
}
