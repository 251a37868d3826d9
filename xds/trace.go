package xds

import (
	"context"
	"slices"

	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/trace"
)

// TracerName is the tracer of the xDS server's spans.
const TracerName = "trustmesh/xds"

// The span of one node's push and its attributes.
const (
	SpanPush          = "xds.push"
	AttrNodeID        = "xds.node_id"
	AttrVersion       = "xds.version"
	AttrPolicyVersion = "xds.policy_version"
	AttrTypes         = "xds.types"
)

// noSpan records nothing; ending it does nothing.
var noSpan = trace.SpanFromContext(context.Background())

// startPush starts the xds.push span of one node's configuration: the
// push's generation (the same for every node of one push) and the policy
// snapshot it was built from. s.mu is held. With tracing off it starts
// nothing.
func (s *Server) startPush(nodeID string) trace.Span {
	if s.tracer == nil {
		return noSpan
	}
	_, span := s.tracer.Start(context.Background(), SpanPush, trace.WithAttributes(
		attribute.String(AttrNodeID, nodeID),
		attribute.Int64(AttrVersion, int64(s.pushes)),
		attribute.Int64(AttrPolicyVersion, int64(s.policyVersion))))
	return span
}

// pushed adds the type URLs of what was published to the span.
func pushed(span trace.Span, pub *published) {
	if !span.IsRecording() {
		return
	}
	types := make([]string, 0, len(pub.types))
	for t := range pub.types {
		types = append(types, t)
	}
	slices.Sort(types)
	span.SetAttributes(attribute.StringSlice(AttrTypes, types))
}
