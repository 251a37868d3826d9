package extauthz

import (
	"context"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/internal/tracing"
)

// TracerName is the tracer ext_authz's spans come from.
const TracerName = "trustmesh/authz"

// Span and attribute names of a traced Check. Attributes say what was
// decided and by which policy and rule, never a header's value, a path or
// a credential: the request's attributes stay in the decision log, which
// redacts them.
const (
	SpanCheck          = "ext_authz.Check"
	AttrDecision       = "authz.decision"
	AttrReason         = "authz.reason"
	AttrPolicy         = "authz.policy"
	AttrRule           = "authz.rule"
	AttrAction         = "authz.action"
	AttrPolicyVersion  = "authz.policy_version"
	AttrTraceContext   = "authz.trace_context"
	traceFromMetadata  = "grpc-metadata"
	traceFromHeader    = "http-header"
	traceFromNowhere   = "none"
	decisionAllow      = "allow"
	decisionDeny       = "deny"
	checkSpanAttrCount = 7
)

// tracedCheck is Check with an ext_authz.Check span. Its parent is the W3C
// context Envoy's gRPC client put in the call's metadata (as otelgrpc
// extracts it), else the traceparent among the request's HTTP headers,
// which Envoy forwards when its connection manager traces.
func (s *Server) tracedCheck(ctx context.Context, req *authv3.CheckRequest, d *engine.Decision) *authv3.CheckResponse {
	from := traceFromMetadata
	pctx, ok := tracing.FromIncomingGRPC(ctx)
	if !ok {
		from = traceFromHeader
		if pctx, ok = tracing.FromHeaders(ctx, req.GetAttributes().GetRequest().GetHttp().GetHeaders()); !ok {
			from, pctx = traceFromNowhere, ctx
		}
	}
	ctx, span := s.tracer.Start(pctx, SpanCheck, trace.WithSpanKind(trace.SpanKindServer))
	defer span.End()
	resp, err := s.check(ctx, req, d)
	if !span.IsRecording() {
		// Not sampled: nothing to say, nothing to allocate for it.
		return resp
	}
	attrs := make([]attribute.KeyValue, 0, checkSpanAttrCount)
	decision := decisionDeny
	if d.Allowed {
		decision = decisionAllow
	}
	attrs = append(attrs,
		attribute.String(AttrDecision, decision),
		attribute.String(AttrReason, d.Reason),
		attribute.Int64(AttrPolicyVersion, int64(d.PolicyVersion)),
		attribute.String(AttrTraceContext, from))
	if d.Policy != "" {
		attrs = append(attrs, attribute.String(AttrPolicy, d.Policy))
	}
	if d.Rule != nil {
		attrs = append(attrs, attribute.Int(AttrRule, *d.Rule))
	}
	if d.Action != "" {
		attrs = append(attrs, attribute.String(AttrAction, d.Action))
	}
	span.SetAttributes(attrs...)
	if err != nil {
		// A deny is an answer, not an error; an evaluation that failed is.
		span.SetStatus(codes.Error, "evaluation error")
	}
	return resp
}
