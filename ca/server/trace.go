package server

import (
	"context"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/internal/tracing"
)

// TracerName is the tracer of the CA's spans.
const TracerName = "trustmesh/ca"

// Span and attribute names of a traced CreateCertificate. ca.sign and
// ca.journal.commit come from package ca and its journal, under ca.Issue.
const (
	SpanIssue        = "ca.Issue"
	SpanAuthenticate = "ca.authenticate"
	AttrAuthnMethod  = "ca.authn.method"
	AttrSerial       = "ca.serial"
	AttrRefusal      = "ca.refusal.reason"
	attrGRPCCode     = "rpc.grpc.status_code"
)

// noSpan records nothing; ending it does nothing.
var noSpan = trace.SpanFromContext(context.Background())

// startIssue starts the ca.Issue server span, child of the W3C context the
// caller put in the call's gRPC metadata, if any. With tracing off it
// starts nothing.
func (s *CertificateService) startIssue(ctx context.Context) (context.Context, trace.Span) {
	if s.tracer == nil {
		return ctx, noSpan
	}
	parent, _ := tracing.FromIncomingGRPC(ctx)
	return s.tracer.Start(parent, SpanIssue, trace.WithSpanKind(trace.SpanKindServer),
		trace.WithAttributes(attribute.String("rpc.system", "grpc"),
			attribute.String("rpc.service", "istio.v1.auth.IstioCertificateService"),
			attribute.String("rpc.method", "CreateCertificate")))
}

func endIssue(span trace.Span, err error) {
	if err != nil && span.IsRecording() {
		code := status.Code(err)
		span.SetAttributes(attribute.Int(attrGRPCCode, int(code)))
		span.SetStatus(codes.Error, code.String())
	}
	span.End()
}

// authenticate runs the authenticator under a ca.authenticate span that
// says how the caller authenticated (or tried to): token, join-token or
// certificate. The span names no credential.
func (s *CertificateService) authenticate(ctx context.Context, creds authn.Credentials) (ca.Caller, error) {
	ctx, span := tracing.Child(ctx, TracerName, SpanAuthenticate)
	defer span.End()
	caller, err := s.cfg.Authenticator.Authenticate(ctx, creds)
	if span.IsRecording() {
		method := caller.Method
		if err != nil || method == "" {
			method = attemptedMethod(creds)
		}
		span.SetAttributes(attribute.String(AttrAuthnMethod, authnMethod(method)))
		if err != nil {
			span.SetStatus(codes.Error, "not authenticated")
		}
	}
	return caller, err
}

// authnMethod names a caller's method as the span says it.
func authnMethod(method string) string {
	switch method {
	case "kubernetes":
		return "token"
	case "x509-renewal":
		return "certificate"
	}
	return method // join-token, none
}
