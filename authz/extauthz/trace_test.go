package extauthz_test

import (
	"context"
	"strings"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"github.com/trustmesh/trustmesh/authz/extauthz"
)

const (
	// Envoy's ext_authz span, as its gRPC client sends it in metadata.
	metadataParent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
	// The request's own span, as Envoy forwards it in the HTTP headers.
	headerParent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
)

func attrs(s sdktrace.ReadOnlySpan) map[attribute.Key]attribute.Value {
	out := map[attribute.Key]attribute.Value{}
	for _, kv := range s.Attributes() {
		out[kv.Key] = kv.Value
	}
	return out
}

// TestCheckSpan checks the ext_authz.Check span over the wire: its parent
// is the W3C context in the call's gRPC metadata first, else the
// traceparent among the request's headers; its attributes say the
// decision, policy and rule, and never a header's value or the path.
func TestCheckSpan(t *testing.T) {
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	defer tp.Shutdown(context.Background())
	addr, stop := serve(t, extauthz.Config{Engine: newEngine(t), InsecurePlaintext: true, TracerProvider: tp})
	defer stop()
	client := dial(t, addr, insecure.NewCredentials())

	for _, tc := range []struct {
		name       string
		md         string // traceparent in gRPC metadata
		path, user string
		wantParent string // trace-id-span-id of the parent, "" for a root
		wantFrom   string
		want       map[attribute.Key]attribute.Value
		absent     []attribute.Key
	}{
		{
			name: "metadata first, denied by a DENY rule", md: metadataParent, path: "/admin", user: "alice",
			wantParent: "4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7", wantFrom: "grpc-metadata",
			want: map[attribute.Key]attribute.Value{
				"authz.decision": attribute.StringValue("deny"), "authz.reason": attribute.StringValue("DENY policy matched"),
				"authz.policy": attribute.StringValue("foo/deny-admin"), "authz.rule": attribute.IntValue(0),
				"authz.action": attribute.StringValue("DENY"),
			},
		},
		{
			name: "header fallback, allowed by the CUSTOM provider", path: "/ok", user: "alice",
			wantParent: "0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331", wantFrom: "http-header",
			want: map[attribute.Key]attribute.Value{
				"authz.decision": attribute.StringValue("allow"), "authz.reason": attribute.StringValue("no policy applies"),
			},
			absent: []attribute.Key{"authz.policy", "authz.rule", "authz.action"},
		},
		{
			name: "no context: a root span", path: "/ok", user: "mallory", wantFrom: "none",
			want: map[attribute.Key]attribute.Value{
				"authz.decision": attribute.StringValue("deny"), "authz.reason": attribute.StringValue("CUSTOM provider denied"),
				"authz.policy": attribute.StringValue("istio-system/ext"), "authz.action": attribute.StringValue("CUSTOM"),
			},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before := len(sr.Ended())
			ctx := context.Background()
			if tc.md != "" {
				ctx = metadata.AppendToOutgoingContext(ctx, "traceparent", tc.md)
			}
			headers := map[string]string{"x-user": tc.user, "authorization": "Bearer s3cret-token"}
			if tc.wantFrom != "none" {
				headers["traceparent"] = headerParent
			}
			if _, err := client.Check(ctx, checkRequest(tc.path, headers)); err != nil {
				t.Fatal(err)
			}
			spans := sr.Ended()[before:]
			if len(spans) != 1 {
				t.Fatalf("%d spans, want 1", len(spans))
			}
			s := spans[0]
			if s.Name() != "ext_authz.Check" || s.SpanKind() != trace.SpanKindServer {
				t.Errorf("span %q kind %v, want ext_authz.Check, server", s.Name(), s.SpanKind())
			}
			if s.InstrumentationScope().Name != "trustmesh/authz" {
				t.Errorf("tracer %q, want trustmesh/authz", s.InstrumentationScope().Name)
			}
			parent := s.Parent()
			switch {
			case tc.wantParent == "" && parent.IsValid():
				t.Errorf("parent %v, want a root span", parent)
			case tc.wantParent != "" && (parent.TraceID().String()+"-"+parent.SpanID().String() != tc.wantParent || !parent.IsRemote()):
				t.Errorf("parent %s-%s, want remote %s", parent.TraceID(), parent.SpanID(), tc.wantParent)
			}
			if tc.wantParent != "" && s.SpanContext().TraceID() != parent.TraceID() {
				t.Errorf("span's trace %s is not its parent's", s.SpanContext().TraceID())
			}
			got := attrs(s)
			tc.want["authz.trace_context"] = attribute.StringValue(tc.wantFrom)
			for k, v := range tc.want {
				if got[k] != v {
					t.Errorf("%s = %v, want %v", k, got[k].Emit(), v.Emit())
				}
			}
			for _, k := range tc.absent {
				if v, ok := got[k]; ok {
					t.Errorf("%s = %v, want it absent", k, v.Emit())
				}
			}
			for k, v := range got {
				if !strings.HasPrefix(string(k), "authz.") {
					t.Errorf("unexpected attribute %s", k)
				}
				for _, secret := range []string{tc.user, "s3cret", tc.path, headerParent} {
					if strings.Contains(v.Emit(), secret) && k != "authz.policy" {
						t.Errorf("attribute %s = %q carries request data %q", k, v.Emit(), secret)
					}
				}
			}
		})
	}
}

// TestCheckUntracedWhenOff checks that a server without a tracer provider
// records nothing, even with a global provider set and a traceparent sent.
func TestCheckUntracedWhenOff(t *testing.T) {
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	defer tp.Shutdown(context.Background())
	prev := otel.GetTracerProvider()
	otel.SetTracerProvider(tp)
	defer otel.SetTracerProvider(prev)
	addr, stop := serve(t, extauthz.Config{Engine: newEngine(t), InsecurePlaintext: true})
	defer stop()
	client := dial(t, addr, insecure.NewCredentials())
	ctx := metadata.AppendToOutgoingContext(context.Background(), "traceparent", metadataParent)
	resp, err := client.Check(ctx, checkRequest("/admin", map[string]string{"traceparent": headerParent}))
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetDeniedResponse() == nil {
		t.Fatal("want a denial")
	}
	if n := len(sr.Ended()) + len(sr.Started()); n != 0 {
		t.Fatalf("%d spans with tracing off, want none", n)
	}
}
