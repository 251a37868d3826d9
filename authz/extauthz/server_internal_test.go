package extauthz

import (
	"bytes"
	"context"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"google.golang.org/protobuf/proto"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
)

// TestSharedResponsesAreEachDecisionsOwn: the responses shared between
// calls (allowed without headers, denials without headers or body) are,
// decision after decision, equal to the one Response builds for it; a
// cache keyed on too little (the reason alone, say) answers one policy's
// denial with another's.
func TestSharedResponsesAreEachDecisionsOwn(t *testing.T) {
	rule := 1
	f := &fixed{}
	s, err := New(Config{Engine: f, InsecurePlaintext: true})
	if err != nil {
		t.Fatal(err)
	}
	decisions := []engine.Decision{
		{Allowed: true, Reason: engine.ReasonAllowMatched, Policy: "ns/a", Rule: &rule},
		{Allowed: true, Reason: engine.ReasonNoPolicy},
		{Allowed: true, Reason: engine.ReasonAllowMatched, Headers: []engine.Header{{Key: "x-user", Value: "alice"}}},
		{Allowed: true, ResponseHeadersToAdd: []engine.Header{{Key: "x-r", Value: "1"}}},
		{Reason: engine.ReasonDenyMatched, Policy: "ns/a", HTTPStatus: 403},
		{Reason: engine.ReasonDenyMatched, Policy: "ns/b", HTTPStatus: 403},
		{Reason: engine.ReasonDenyMatched, Policy: "ns/b", HTTPStatus: 401},
		{Reason: engine.ReasonNoAllowMatched, HTTPStatus: 403},
		{Reason: engine.ReasonNoAllowMatched},
		{Reason: engine.ReasonCustomDenied, Policy: "ns/c", HTTPStatus: 401, Body: "go away"},
		{Reason: engine.ReasonCustomDenied, Policy: "ns/c", HTTPStatus: 401, Headers: []engine.Header{{Key: "www-authenticate", Value: "Bearer"}}},
	}
	for round := range 2 {
		for i, d := range decisions {
			f.d = d
			got, err := s.Check(context.Background(), benchRequest())
			if err != nil {
				t.Fatal(err)
			}
			if want := Response(&d); !proto.Equal(got, want) {
				t.Errorf("round %d, decision %d: response %v, want %v", round, i, got, want)
			}
		}
	}
}

// TestCheckAllocatesNothingAroundTheDecision: with metrics and the
// decision log on, the server's own part of a Check (pooled Decision,
// counters, queueing the log entry, the shared response) allocates
// nothing, allowed or denied, around a decision that allocates nothing.
func TestCheckAllocatesNothingAroundTheDecision(t *testing.T) {
	dl, err := decisionlog.New(decisionlog.Config{Writer: &bytes.Buffer{}, QueueSize: 1 << 12})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- dl.Run(ctx) }()
	defer func() { cancel(); <-done }()
	rule := 0
	f := &fixed{}
	s, err := New(Config{Engine: f, InsecurePlaintext: true, Log: dl, Metrics: NewMetrics(prometheus.NewRegistry())})
	if err != nil {
		t.Fatal(err)
	}
	req := benchRequest()
	for _, d := range []engine.Decision{
		{Allowed: true, Reason: engine.ReasonAllowMatched, Policy: "foo/allow", Rule: &rule, Action: "ALLOW"},
		{Reason: engine.ReasonDenyMatched, Policy: "foo/deny", Rule: &rule, Action: "DENY", HTTPStatus: 403},
	} {
		f.d = d
		if n := testing.AllocsPerRun(500, func() { _, _ = s.Check(context.Background(), req) }); n != 0 {
			t.Errorf("allowed=%v: Check allocates %v per call, want 0", d.Allowed, n)
		}
	}
}
