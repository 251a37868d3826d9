// Package tracing sets up OpenTelemetry tracing from the standard
// environment variables, with trustmesh's rules for turning it on, and
// carries W3C trace context in and out of gRPC metadata.
//
// Tracing is on only when OTEL_TRACES_EXPORTER names an exporter, otlp or
// console. Unset, empty or none leaves it off, and OTEL_SDK_DISABLED=true
// turns it off whatever else is set. The OpenTelemetry Go SDK does not read
// OTEL_TRACES_EXPORTER or OTEL_EXPORTER_OTLP_PROTOCOL itself; contrib's
// autoexport does, but it exports over OTLP when the variable is unset,
// which would turn tracing on for every start. So this package reads those
// two, and leaves everything else to the SDK and its exporters:
// OTEL_EXPORTER_OTLP_*ENDPOINT, _HEADERS, _TIMEOUT and the TLS settings,
// OTEL_TRACES_SAMPLER(_ARG), OTEL_BSP_*, OTEL_SERVICE_NAME and
// OTEL_RESOURCE_ATTRIBUTES.
//
// Components take a trace.TracerProvider in their configuration; nil means
// tracing is off, and they then start no span at all, so that being off
// costs nothing on hot paths.
package tracing

import (
	"context"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/exporters/stdout/stdouttrace"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/trace"
)

// The environment variables this package reads itself.
const (
	EnvExporter         = "OTEL_TRACES_EXPORTER"
	EnvSDKDisabled      = "OTEL_SDK_DISABLED"
	EnvProtocol         = "OTEL_EXPORTER_OTLP_PROTOCOL"
	EnvTracesProtocol   = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"
	DefaultServiceName  = "trustmesh"
	ProtocolHTTP        = "http/protobuf"
	ProtocolGRPC        = "grpc"
	ExporterOTLP        = "otlp"
	ExporterConsole     = "console"
	exporterNone        = "none"
	serviceNameResource = "service.name"
)

// Lookup reads one environment variable; os.LookupEnv is one.
type Lookup func(key string) (string, bool)

// Settings are what the environment asks of tracing.
type Settings struct {
	// Exporters are the exporters asked for, in order; none means tracing
	// is off.
	Exporters []string
	// Protocol is the OTLP protocol, when otlp is among Exporters.
	Protocol string
}

// On reports whether tracing is on.
func (s Settings) On() bool { return len(s.Exporters) > 0 }

// ErrConfig marks environment variables this package cannot honour.
var ErrConfig = errors.New("tracing: invalid environment")

// Parse reads the settings from env, collecting every error. A value it
// does not know is an error rather than tracing silently off or on.
func Parse(env Lookup) (Settings, error) {
	get := func(k string) string {
		v, _ := env(k)
		return strings.TrimSpace(v)
	}
	if strings.EqualFold(get(EnvSDKDisabled), "true") {
		return Settings{}, nil
	}
	var s Settings
	var errs []error
	raw := get(EnvExporter)
	if raw == "" {
		return Settings{}, nil
	}
	names := strings.Split(raw, ",")
	for _, n := range names {
		n = strings.ToLower(strings.TrimSpace(n))
		switch n {
		case ExporterOTLP, ExporterConsole:
			if !slices.Contains(s.Exporters, n) {
				s.Exporters = append(s.Exporters, n)
			}
		case exporterNone:
			if len(names) > 1 {
				errs = append(errs, fmt.Errorf("%w: %s=%q: none cannot be combined with an exporter", ErrConfig, EnvExporter, raw))
			}
		default:
			errs = append(errs, fmt.Errorf("%w: %s=%q: unknown exporter %q (want otlp, console or none)", ErrConfig, EnvExporter, raw, n))
		}
	}
	if slices.Contains(s.Exporters, ExporterOTLP) {
		key, p := EnvTracesProtocol, get(EnvTracesProtocol)
		if p == "" {
			key, p = EnvProtocol, get(EnvProtocol)
		}
		switch p {
		case "", ProtocolHTTP:
			s.Protocol = ProtocolHTTP
		case ProtocolGRPC:
			s.Protocol = ProtocolGRPC
		default:
			errs = append(errs, fmt.Errorf("%w: %s=%q: want %s or %s", ErrConfig, key, p, ProtocolHTTP, ProtocolGRPC))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return Settings{}, err
	}
	return s, nil
}

// Provider is tracing set up from the environment.
type Provider struct {
	// TracerProvider is nil when tracing is off; components then trace
	// nothing.
	TracerProvider trace.TracerProvider
	sdk            *sdktrace.TracerProvider
}

// Shutdown flushes the spans not yet exported and stops the exporters. It
// does nothing when tracing is off.
func (p *Provider) Shutdown(ctx context.Context) error {
	if p == nil || p.sdk == nil {
		return nil
	}
	if err := p.sdk.Shutdown(ctx); err != nil {
		return fmt.Errorf("tracing: shutdown: %w", err)
	}
	return nil
}

// Setup reads the settings from env and, when tracing is on, builds the
// exporters and the SDK's tracer provider, and makes it and the W3C trace
// context propagator the global ones (for libraries that use them). When
// off, it changes nothing global and returns a Provider with a nil
// TracerProvider. The console exporter writes to console.
func Setup(ctx context.Context, env Lookup, console io.Writer) (*Provider, error) {
	s, err := Parse(env)
	if err != nil {
		return nil, err
	}
	if !s.On() {
		return &Provider{}, nil
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(attribute.String(serviceNameResource, DefaultServiceName)),
		resource.WithTelemetrySDK(),
		// OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES override the
		// default name.
		resource.WithFromEnv(),
	)
	if err != nil {
		return nil, fmt.Errorf("tracing: resource: %w", err)
	}
	opts := []sdktrace.TracerProviderOption{sdktrace.WithResource(res)}
	var made []sdktrace.SpanExporter
	for _, name := range s.Exporters {
		exp, err := newExporter(ctx, name, s.Protocol, console)
		if err != nil {
			for _, e := range made {
				_ = e.Shutdown(ctx)
			}
			return nil, err
		}
		made = append(made, exp)
		opts = append(opts, sdktrace.WithBatcher(exp))
	}
	tp := sdktrace.NewTracerProvider(opts...)
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	return &Provider{TracerProvider: tp, sdk: tp}, nil
}

func newExporter(ctx context.Context, name, protocol string, console io.Writer) (sdktrace.SpanExporter, error) {
	var (
		exp sdktrace.SpanExporter
		err error
	)
	switch {
	case name == ExporterConsole:
		if console == nil {
			console = io.Discard
		}
		exp, err = stdouttrace.New(stdouttrace.WithWriter(console))
	case protocol == ProtocolGRPC:
		exp, err = otlptracegrpc.New(ctx)
	default:
		exp, err = otlptracehttp.New(ctx)
	}
	if err != nil {
		return nil, fmt.Errorf("tracing: %s exporter: %w", name, err)
	}
	return exp, nil
}
