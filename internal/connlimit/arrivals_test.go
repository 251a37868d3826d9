package connlimit_test

import (
	"context"
	"errors"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/internal/connlimit/connlimittest"
)

const checkPath = "/grpc.health.v1.Health/Check"

// serveRequests serves the health service (and a method that never reads,
// rv.Sink/Hold) with GRPCOptionsFor(r).
func serveRequests(t *testing.T, cfg connlimit.Config, r connlimit.Requests) (string, *health.Server) {
	t.Helper()
	l, err := cfg.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(cfg.GRPCOptionsFor(r)...)
	hs := health.NewServer()
	healthpb.RegisterHealthServer(g, hs)
	g.RegisterService(&holdDesc, struct{}{})
	done := make(chan error, 1)
	go func() { done <- g.Serve(l) }()
	t.Cleanup(func() {
		g.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve = %v", err)
		}
	})
	return l.Addr().String(), hs
}

// holdDesc is a bidi method whose handler never reads: a stream whose
// handler is busy (an xDS stream blocked on a push) while its peer writes.
var holdDesc = grpc.ServiceDesc{
	ServiceName: "rv.Sink",
	HandlerType: (*any)(nil),
	Streams: []grpc.StreamDesc{{StreamName: "Hold", ServerStreams: true, ClientStreams: true,
		Handler: func(_ any, ss grpc.ServerStream) error { <-ss.Context().Done(); return nil }}},
}

func slowPeer(t *testing.T, addr string) *connlimittest.SlowPeer {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return connlimittest.NewSlowPeer(t, conn)
}

func check(addr string) error {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_, err = healthpb.NewHealthClient(conn).Check(ctx, &healthpb.HealthCheckRequest{})
	return err
}

// A request message that does not arrive within ReadTimeout ends its RPC
// (and frees what the server received of it), however well its peer
// answers keepalive.
func TestSlowRequestIsCut(t *testing.T) {
	cfg := connlimit.Config{ReadTimeout: 300 * time.Millisecond}
	addr, _ := serveRequests(t, cfg, connlimit.Requests{})
	p := slowPeer(t, addr)
	if err := p.OpenPartial(1, checkPath, 1000); err != nil {
		t.Fatal(err)
	}
	if why := p.AwaitEnded(1, 5*time.Second); why == "" {
		t.Fatalf("a request message still arriving after %s was not cut within 5 s", cfg.ReadTimeout)
	} else {
		t.Logf("cut: %s", why)
	}
	if err := check(addr); err != nil {
		t.Fatalf("a whole request after the cut: %v", err)
	}
}

// One connection may have at most MaxArriving RPCs waiting for their
// message; the next is refused, and other connections are served.
func TestArrivingPerConnection(t *testing.T) {
	addr, _ := serveRequests(t, connlimit.Config{}, connlimit.Requests{MaxArriving: 4})
	p := slowPeer(t, addr)
	for i := range 5 {
		if err := p.OpenPartial(uint32(2*i+1), checkPath, 1000); err != nil {
			t.Fatal(err)
		}
	}
	if why := p.AwaitEnded(9, 5*time.Second); !strings.HasPrefix(why, "grpc-status 8 ") {
		t.Fatalf("the 5th arriving RPC of a connection that may have 4 ended %q, want RESOURCE_EXHAUSTED", why)
	}
	if open, why := p.Open(); open != 4 {
		t.Fatalf("%d of the first 4 streams open (%s), want 4", open, why)
	}
	if err := check(addr); err != nil {
		t.Fatalf("another connection's request: %v", err)
	}
}

// An RPC whose stream ended before its message was in (here: grpc-go
// refused the message as too large) gives its place back when its
// connection needs it, not only when ReadTimeout passes.
func TestEndedRPCsFreeTheirPlace(t *testing.T) {
	addr, _ := serveRequests(t, connlimit.Config{}, connlimit.Requests{MaxMessage: 4 << 10, MaxArriving: 2})
	p := slowPeer(t, addr)
	for i := range 2 {
		if err := p.OpenPartial(uint32(2*i+1), checkPath, 1<<20); err != nil {
			t.Fatal(err)
		}
		if why := p.AwaitEnded(uint32(2*i+1), 5*time.Second); !strings.HasPrefix(why, "grpc-status 8 ") {
			t.Fatalf("a message over MaxMessage ended %q, want RESOURCE_EXHAUSTED", why)
		}
	}
	for i := 2; i < 4; i++ {
		if err := p.OpenPartial(uint32(2*i+1), checkPath, 1000); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(200 * time.Millisecond)
	if why := p.Ended(5) + p.Ended(7); why != "" {
		t.Fatalf("after two refused messages, a connection that may have 2 arriving could not open 2: %s", why)
	}
}

// When the port's places for arriving RPCs are full, a new RPC of another
// connection is refused while the requests holding them are young, and
// takes the place of the oldest of the connection with the most once they
// have been arriving for a second.
func TestArrivingPortMakesRoom(t *testing.T) {
	// connlimit's arrivalGrace, which an external test cannot read.
	const arrivalGrace = time.Second
	// 64 MiB messages: the port's 256 MiB budget is 4 places.
	addr, _ := serveRequests(t, connlimit.Config{}, connlimit.Requests{MaxMessage: 64 << 20, MaxArriving: 4})
	p := slowPeer(t, addr)
	opened := time.Now()
	for i := range 4 {
		if err := p.OpenPartial(uint32(2*i+1), checkPath, 1000); err != nil {
			t.Fatal(err)
		}
	}
	// The server admits an RPC when it reads its HEADERS: once it has
	// answered a PING sent after the four, the four are in.
	if err := p.Ping(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	in := time.Now()
	if err := check(addr); status.Code(err) != codes.ResourceExhausted {
		t.Fatalf("a request while the port's places hold young requests (%s after they were in): %v, want ResourceExhausted",
			time.Since(in), err)
	}
	// Once they have been arriving for a second, the next request takes
	// the oldest one's place: not before (they began to arrive after
	// opened), and not much after (they were in by in).
	var err error
	for deadline := in.Add(arrivalGrace + 1500*time.Millisecond); ; time.Sleep(20 * time.Millisecond) {
		if err = check(addr); err == nil || time.Now().After(deadline) {
			break
		}
	}
	if err != nil {
		t.Fatalf("a request %s after the port's places were filled, %s past the grace: %v",
			time.Since(in), time.Since(in)-arrivalGrace, err)
	}
	if since := time.Since(opened); since < arrivalGrace {
		t.Fatalf("a young request was cut %s after it began to arrive, within the grace of %s", since, arrivalGrace)
	}
	if why := p.AwaitEnded(1, 5*time.Second); why == "" {
		t.Fatal("the oldest slow request was not cut to make room")
	}
	if open, why := p.Open(); open != 3 {
		t.Fatalf("%d slow requests open (%s), want 3", open, why)
	}
}

// Only the first message has a deadline: a stream that has it (an xDS
// proxy's, an agent's bundle watch) lives on, quiet, past ReadTimeout.
func TestStreamsOutliveReadTimeout(t *testing.T) {
	cfg := connlimit.Config{ReadTimeout: 200 * time.Millisecond}
	addr, hs := serveRequests(t, cfg, connlimit.Requests{})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	w, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{Service: "x"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := w.Recv(); err != nil {
		t.Fatal(err)
	}
	time.Sleep(4 * cfg.ReadTimeout)
	hs.SetServingStatus("x", healthpb.HealthCheckResponse_SERVING)
	got, err := w.Recv()
	if err != nil || got.GetStatus() != healthpb.HealthCheckResponse_SERVING {
		t.Fatalf("a watch %s past its request: %v, %v", 4*cfg.ReadTimeout, got, err)
	}
}

// Envoy multiplexes ext_authz checks on one connection: a connection may
// have as many RPCs arriving at once as it may have streams.
func TestManyConcurrentRequestsOnOneConnection(t *testing.T) {
	addr, _ := serveRequests(t, connlimit.Config{}, connlimit.Requests{})
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	client := healthpb.NewHealthClient(conn)
	const n = connlimit.DefaultMaxStreams
	var wg sync.WaitGroup
	errs := make(chan error, n)
	start := make(chan struct{})
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			if _, err := client.Check(ctx, &healthpb.HealthCheckRequest{}); err != nil {
				errs <- err
			}
		}()
	}
	close(start)
	wg.Wait()
	close(errs)
	failed := 0
	var first error
	for err := range errs {
		if failed++; first == nil {
			first = err
		}
	}
	if failed > 0 {
		t.Fatalf("%d of %d concurrent requests on one connection failed, the first: %v", failed, n, first)
	}
}

// What a stream can make the server hold before its handler reads is
// bounded by the stream's window, 64 KiB: grpc-go returns the connection's
// window as data arrives, so the connection's window bounds nothing
// unread.
func TestUnreadDataBoundedPerStream(t *testing.T) {
	addr, _ := serveRequests(t, connlimit.Config{}, connlimit.Requests{})
	p := slowPeer(t, addr)
	const streams = 64
	for i := range streams {
		if err := p.OpenPartial(uint32(2*i+1), "/rv.Sink/Hold", 4<<20); err != nil {
			t.Fatal(err)
		}
	}
	time.Sleep(1500 * time.Millisecond)
	win, _ := p.Settings()
	if sent := p.Sent(); sent > streams*(64<<10) {
		t.Fatalf("%d never-read streams on one connection made the server hold %d KiB (initial window %d), want at most 64 KiB each",
			streams, sent>>10, win)
	} else {
		t.Logf("%d never-read streams: the server took %d KiB (initial window %d)", streams, sent>>10, win)
	}
}

// A header block is at most 64 KiB: a call whose header list comes to more
// is refused, its stream reset or its connection closed, before any
// handler runs; one a little under it (64,838 bytes as grpc-go counts a
// header list) is not refused.
func TestHeaderBlockBound(t *testing.T) {
	addr, _ := serveRequests(t, connlimit.Config{}, connlimit.Requests{})
	under := slowPeer(t, addr)
	if err := under.OpenWithHeader(1, "/rv.Sink/Hold", 63<<10); err != nil {
		t.Fatal(err)
	}
	if why := under.AwaitEnded(1, time.Second); why != "" {
		t.Fatalf("a call with a 63 KiB header was refused: %s", why)
	}
	if open, why := under.Open(); open != 1 {
		t.Fatalf("a call with a 63 KiB header: %d open (%s)", open, why)
	}
	over := slowPeer(t, addr)
	if err := over.OpenWithHeader(1, "/rv.Sink/Hold", 65<<10); err != nil && !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Fatal(err)
	}
	deadline := time.Now().Add(5 * time.Second)
	for {
		open, why := over.Open()
		if open == 0 {
			t.Logf("a call with a 65 KiB header: %s", why)
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("a call with a 65 KiB header is still open after 5 s")
		}
		time.Sleep(20 * time.Millisecond)
	}
}
