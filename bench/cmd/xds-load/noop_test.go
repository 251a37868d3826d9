package main

import (
	"context"
	"net"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestNoopFloorHoldsAndPushes runs the tool against the no-op floor in
// both modes: every client must enrol, get svc-0's endpoints and follow
// each change round, as against serve, or the floor's figures would not
// be the same fleet's.
func TestNoopFloorHoldsAndPushes(t *testing.T) {
	for _, delta := range []bool{false, true} {
		o, stop := startTestFloor(t)
		o.delta, o.rounds = delta, 2
		r, err := run(o)
		stop()
		if err != nil {
			t.Fatalf("delta %v: %v", delta, err)
		}
		if len(r.ConvergeS) != 2 || r.StreamsReopened != 0 {
			t.Fatalf("delta %v: %d rounds converged, %d streams reopened; want 2 and 0", delta, len(r.ConvergeS), r.StreamsReopened)
		}
	}
}

// A stream the server refuses with ResourceExhausted, as serve's port does
// when too many streams are still waiting for their first request, or
// cuts before answering it (Canceled, as serve's port does to a stream
// whose first request is slow to arrive), is opened again after Envoy's
// backoff and counted, as an Envoy retries it; it does not fail the run. The refusal may reach the client before or
// after its first Send; "late send" forces the second, where grpc-go's
// Send reports only io.EOF and the refusal must be read from Recv.
func TestRefusedStreamsAreOpenedAgain(t *testing.T) {
	lateSend := grpc.WithChainStreamInterceptor(func(ctx context.Context, desc *grpc.StreamDesc, cc *grpc.ClientConn, method string, streamer grpc.Streamer, opts ...grpc.CallOption) (grpc.ClientStream, error) {
		s, err := streamer(ctx, desc, cc, method, opts...)
		if err != nil {
			return nil, err
		}
		return &lateSender{ClientStream: s}, nil
	})
	for _, refusal := range []*status.Status{
		status.New(codes.ResourceExhausted, "connlimit: too many requests still arriving"),
		status.New(codes.Canceled, context.Canceled.Error()),
	} {
		for name, dial := range map[string][]grpc.DialOption{"send first": nil, "late send": {lateSend}} {
			t.Run(refusal.Code().String()+"/"+name, func(t *testing.T) {
				const refuse = 10
				var refused atomic.Int64
				o, stop := startTestFloor(t, grpc.ChainStreamInterceptor(
					func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
						if strings.HasSuffix(info.FullMethod, "AggregatedResources") && refused.Add(1) <= refuse {
							return refusal.Err()
						}
						return handler(srv, ss)
					}))
				defer stop()
				o.delta, o.rounds, o.dialOptions = true, 1, dial
				var waits atomic.Int64
				o.retryBackoff = func(int) time.Duration {
					waits.Add(1)
					return time.Millisecond
				}
				r, err := run(o)
				if err != nil {
					t.Fatal(err)
				}
				if r.StreamsReopened != refuse || !strings.Contains(r.LastReopen, refusal.Code().String()) {
					t.Fatalf("%d streams reopened, the last after %q; want %d, after %s", r.StreamsReopened, r.LastReopen, refuse, refusal.Code())
				}
				if waits.Load() != refuse {
					t.Fatalf("%d backoff waits, want %d: a refused stream must wait before it is opened again", waits.Load(), refuse)
				}
			})
		}
	}
}

// lateSender holds a stream's first Send until the server has had time
// to refuse it, so that the Send finds the stream already ended.
type lateSender struct {
	grpc.ClientStream
	sent bool
}

func (s *lateSender) SendMsg(m any) error {
	if !s.sent {
		s.sent = true
		time.Sleep(50 * time.Millisecond)
	}
	return s.ClientStream.SendMsg(m)
}

// A client refused more often than it may reopen fails the run, without
// waiting a backoff after its last refusal.
func TestRefusedTooOftenFails(t *testing.T) {
	var refused atomic.Int64
	o, stop := startTestFloor(t, grpc.ChainStreamInterceptor(
		func(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
			if strings.HasSuffix(info.FullMethod, "AggregatedResources") {
				refused.Add(1)
				return status.Error(codes.ResourceExhausted, "connlimit: too many requests still arriving")
			}
			return handler(srv, ss)
		}))
	defer stop()
	o.delta, o.rounds, o.clients, o.roundTimeout = true, 1, 1, 10*time.Second
	var waits []int
	var mu sync.Mutex
	o.retryBackoff = func(refusals int) time.Duration {
		mu.Lock()
		defer mu.Unlock()
		waits = append(waits, refusals)
		return time.Millisecond
	}
	if _, err := run(o); err == nil || !strings.Contains(err.Error(), "ResourceExhausted") {
		t.Fatalf("run() = %v, want a failure for the refused client", err)
	}
	mu.Lock()
	defer mu.Unlock()
	if !slices.Equal(waits, []int{0, 1, 2}) || refused.Load() != maxReopens+1 {
		t.Fatalf("backoffs %v over %d refusals; want [0 1 2] over %d: growing with the refusals in a row, none after the last", waits, refused.Load(), maxReopens+1)
	}
}

func TestEnvoyRetryBackoff(t *testing.T) {
	for attempt, ceiling := range []time.Duration{500 * time.Millisecond, time.Second, 2 * time.Second, 4 * time.Second} {
		var longest time.Duration
		for range 1000 {
			d := envoyRetryBackoff(attempt)
			if d <= 0 || d > ceiling+time.Millisecond {
				t.Fatalf("attempt %d: %s, want in (0, %s]", attempt, d, ceiling)
			}
			longest = max(longest, d)
		}
		if longest < ceiling/2 {
			t.Fatalf("attempt %d: longest of 1000 is %s, want the jitter to spread up to %s", attempt, longest, ceiling)
		}
	}
	if d := envoyRetryBackoff(20); d > 30*time.Second+time.Millisecond {
		t.Fatalf("attempt 20: %s, want at most 30 s", d)
	}
}

// startTestFloor starts the no-op floor, with extra server options, on a
// mesh of 20 services and 40 clients, and returns the tool's options for
// it (rounds and mode left to the caller) and how to stop it.
func startTestFloor(t *testing.T, extra ...grpc.ServerOption) (options, func()) {
	t.Helper()
	dir := t.TempDir()
	mesh := filepath.Join(dir, "mesh")
	if err := writeMesh(mesh, 20, 40, 0, 0); err != nil {
		t.Fatal(err)
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(dir, "ca.pem")
	srv, stopWatch, err := startNoop(mesh, caFile, extra...)
	if err != nil {
		t.Fatal(err)
	}
	go func() { _ = srv.Serve(lis) }()
	return options{meshDir: mesh, addr: lis.Addr().String(), caFile: caFile, token: "floor",
			services: 20, clients: 40, perConn: 2, dialConcurrency: 8,
			roundTimeout: 20 * time.Second, grpcTimeout: time.Second},
		func() { srv.Stop(); stopWatch() }
}
