package engine_test

import (
	"context"
	"fmt"
	"testing"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// The common path of Check (issue 11): a request that no policy applies
// to, among many that select other workloads, and a request that one
// ALLOW rule matches. Both allocate nothing in CheckInto.
//
//	go test ./authz/engine -run '^$' -bench 'BenchmarkCheck(NoMatch|SingleAllow)' -benchmem
var commonPathSizes = []int{10, 100, 1000, 10000}

// commonPathEngine serves benchPolicies(n): n policies over n/10
// namespaces, each selecting its own workload, and a mesh-wide DENY.
func commonPathEngine(tb testing.TB, n int, backend engine.Backend) *engine.Engine {
	tb.Helper()
	set, err := engine.Build(context.Background(), engine.SetConfig{Policies: benchPolicies(tb, n), Backend: backend})
	if err != nil {
		tb.Fatal(err)
	}
	e := engine.New()
	e.Swap(set)
	return e
}

// noMatchRequest is for a workload of ns0 that no policy selects: only
// the mesh-wide DENY applies, and it does not match.
func noMatchRequest() *authv3.CheckRequest {
	req := benchRequest("/api/v1/books?page=2")
	req.Attributes.Destination.Labels = map[string]string{"app": "unknown", "version": "v1"}
	return req
}

// singleAllowRequest matches rule 0 of ns0/svc0 and nothing else.
func singleAllowRequest() *authv3.CheckRequest { return benchRequest("/api/v1/books?page=2") }

func checkInto(tb testing.TB, e *engine.Engine, req *authv3.CheckRequest, d *engine.Decision, wantPolicy string) {
	if err := e.CheckInto(context.Background(), req, d); err != nil || !d.Allowed || d.Policy != wantPolicy {
		tb.Fatalf("decision %+v, error %v; want allowed by %q", d, err, wantPolicy)
	}
}

func BenchmarkCheckNoMatch(b *testing.B) {
	for _, n := range commonPathSizes {
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			e, req, d := commonPathEngine(b, n, ""), noMatchRequest(), new(engine.Decision)
			b.ReportAllocs()
			for b.Loop() {
				checkInto(b, e, req, d, "")
			}
		})
	}
}

func BenchmarkCheckSingleAllow(b *testing.B) {
	for _, n := range commonPathSizes {
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			e, req, d := commonPathEngine(b, n, ""), singleAllowRequest(), new(engine.Decision)
			b.ReportAllocs()
			for b.Loop() {
				checkInto(b, e, req, d, "ns0/svc0")
			}
		})
	}
}

// BenchmarkCheckRego is BenchmarkCheckSingleAllow on the Rego back end,
// for comparison.
func BenchmarkCheckRego(b *testing.B) {
	for _, n := range []int{10, 1000} {
		b.Run(fmt.Sprintf("policies=%d", n), func(b *testing.B) {
			e, req, d := commonPathEngine(b, n, engine.BackendRego), singleAllowRequest(), new(engine.Decision)
			b.ReportAllocs()
			for b.Loop() {
				checkInto(b, e, req, d, "ns0/svc0")
			}
		})
	}
}

// TestCheckIntoAllocatesNothing holds the common path to 0 allocations:
// it fails if a change adds one.
func TestCheckIntoAllocatesNothing(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector allocates")
	}
	e := commonPathEngine(t, 1000, "")
	for _, c := range []struct {
		name   string
		req    *authv3.CheckRequest
		policy string
	}{
		{"no match", noMatchRequest(), ""},
		{"single allow", singleAllowRequest(), "ns0/svc0"},
	} {
		d := new(engine.Decision)
		if n := testing.AllocsPerRun(200, func() { checkInto(t, e, c.req, d, c.policy) }); n != 0 {
			t.Errorf("%s: %v allocations per CheckInto, want 0", c.name, n)
		}
	}
}
