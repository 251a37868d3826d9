package controlplane_test

import (
	"context"
	"sort"
	"strings"
	"testing"
	"time"

	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"google.golang.org/grpc/metadata"
	pb "istio.io/api/security/v1alpha1"

	"github.com/trustmesh/trustmesh/controlplane"
)

// TestServeTracesIssuance: the assembled control plane hands
// Config.TracerProvider to the CA, so that an issuance is one ca.Issue span
// in the caller's trace with its authenticate, sign and journal commit.
func TestServeTracesIssuance(t *testing.T) {
	sr := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(sr))
	defer tp.Shutdown(context.Background())
	e := start(t, func(c *controlplane.Config) { c.TracerProvider = tp })
	tok := e.token(vmID, 10*time.Minute)
	c := newClient(t)
	ctx := metadata.NewOutgoingContext(context.Background(), metadata.Pairs("authorization", "Bearer "+tok,
		"traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"))
	if _, err := e.dial(c, "localhost").CreateCertificate(ctx, &pb.IstioCertificateRequest{Csr: c.csr(t, ""), ValidityDuration: 3600}); err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, s := range sr.Ended() {
		if s.SpanContext().TraceID().String() == "4bf92f3577b34da6a3ce929d0e0e4736" {
			got = append(got, s.Name())
		}
	}
	sort.Strings(got)
	if want := "ca.Issue ca.authenticate ca.journal.commit ca.sign"; strings.Join(got, " ") != want {
		t.Fatalf("spans in the caller's trace: %v, want %s", got, want)
	}
}
