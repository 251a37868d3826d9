package connlimit_test

import (
	"context"
	"errors"
	"net/http"
	"os"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/types/known/emptypb"

	"github.com/trustmesh/trustmesh/internal/connlimit"
	"github.com/trustmesh/trustmesh/internal/connlimit/connlimittest"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

// short is a Config whose timeouts a test can wait out.
var short = connlimit.Config{
	MaxConnections:   8,
	HandshakeTimeout: 300 * time.Millisecond,
	IdleTimeout:      300 * time.Millisecond,
}

func serveHTTP(t *testing.T, cfg connlimit.Config) string {
	t.Helper()
	l, err := cfg.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := cfg.HTTPServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write([]byte("ok\n")) }))
	done := make(chan error, 1)
	go func() { done <- srv.Serve(l) }()
	t.Cleanup(func() {
		_ = srv.Close()
		if err := <-done; !errors.Is(err, http.ErrServerClosed) {
			t.Errorf("Serve = %v", err)
		}
	})
	return l.Addr().String()
}

func serveGRPC(t *testing.T, cfg connlimit.Config) string {
	t.Helper()
	l, err := cfg.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(cfg.GRPCOptions()...)
	healthpb.RegisterHealthServer(g, health.NewServer())
	done := make(chan error, 1)
	go func() { done <- g.Serve(l) }()
	t.Cleanup(func() {
		g.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve = %v", err)
		}
	})
	return l.Addr().String()
}

func TestHTTPClosesIdleConnections(t *testing.T) {
	addr := serveHTTP(t, short)
	t.Run("keep-alive after a request", func(t *testing.T) {
		connlimittest.ClosesIdle(t, addr, connlimittest.HTTP(nil, "/"), 5*time.Second)
	})
	t.Run("no request at all", func(t *testing.T) {
		connlimittest.ClosesIdle(t, addr, connlimittest.Silent, 5*time.Second)
	})
}

func TestHTTPCapHolds(t *testing.T) {
	cfg := short
	cfg.HandshakeTimeout, cfg.IdleTimeout = 0, 0 // the held connections must outlive the test
	connlimittest.CapHolds(t, serveHTTP(t, cfg), cfg.MaxConnections, connlimittest.HTTP(nil, "/"))
}

func TestGRPCClosesIdleConnections(t *testing.T) {
	addr := serveGRPC(t, short)
	t.Run("no RPC after the preface", func(t *testing.T) {
		connlimittest.ClosesIdle(t, addr, connlimittest.GRPC(nil), 5*time.Second)
	})
	t.Run("no preface", func(t *testing.T) {
		connlimittest.ClosesIdle(t, addr, connlimittest.Silent, 5*time.Second)
	})
}

func TestGRPCCapHolds(t *testing.T) {
	cfg := short
	cfg.HandshakeTimeout, cfg.IdleTimeout = 0, 0 // the held connections must outlive the test
	connlimittest.CapHolds(t, serveGRPC(t, cfg), cfg.MaxConnections, connlimittest.GRPC(nil))
}

// A connection with an RPC in flight is not idle, however long the RPC.
func TestGRPCKeepsBusyConnections(t *testing.T) {
	addr := serveGRPC(t, short)
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := healthpb.NewHealthClient(conn).Watch(ctx, &healthpb.HealthCheckRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := stream.Recv(); err != nil {
		t.Fatal(err)
	}
	recv := make(chan error, 1)
	go func() { _, err := stream.Recv(); recv <- err }()
	select {
	case err := <-recv:
		t.Fatalf("a watch was ended while in flight: %v", err)
	case <-time.After(4 * short.IdleTimeout):
	}
}

// An xDS stream is long-lived and may carry nothing for far longer than
// the idle timeout (no configuration change); the server must not end it
// (Envoys would reconnect, all at once at twenty thousand). Watched on
// both ends: the server's handler must still be running, and the client
// must still hold its stream.
func TestGRPCKeepsQuietStreams(t *testing.T) {
	l, err := short.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ended := make(chan error, 1)
	g := grpc.NewServer(short.GRPCOptions()...)
	g.RegisterService(&grpc.ServiceDesc{
		ServiceName: "trustmesh.test.Quiet", HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{StreamName: "Watch", ServerStreams: true, ClientStreams: true,
			Handler: func(_ any, s grpc.ServerStream) error {
				if err := s.SendMsg(&emptypb.Empty{}); err != nil {
					return err
				}
				<-s.Context().Done()
				ended <- s.Context().Err()
				return nil
			}}},
	}, struct{}{})
	done := make(chan error, 1)
	go func() { done <- g.Serve(l) }()
	defer func() {
		g.Stop()
		if err := <-done; err != nil {
			t.Errorf("Serve = %v", err)
		}
	}()
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/trustmesh.test.Quiet/Watch")
	if err != nil {
		t.Fatal(err)
	}
	if err := stream.RecvMsg(&emptypb.Empty{}); err != nil {
		t.Fatal(err)
	}
	recv := make(chan error, 1)
	go func() { recv <- stream.RecvMsg(&emptypb.Empty{}) }()
	select {
	case err := <-ended:
		t.Fatalf("the server ended a quiet stream: %v", err)
	case err := <-recv:
		t.Fatalf("the client's quiet stream ended: %v", err)
	case <-time.After(6 * short.IdleTimeout):
	}
	if s := conn.GetState(); s != connectivity.Ready {
		t.Fatalf("connection %s after a quiet stream outlived the idle timeout, want READY", s)
	}
	cancel()
	if err := <-ended; !errors.Is(err, context.Canceled) {
		t.Errorf("handler's context ended with %v, want Canceled when the client cancels", err)
	}
}

func TestDefaultsAndValidate(t *testing.T) {
	d := connlimit.Config{}.WithDefaults()
	if d.MaxConnections != 1024 || d.IdleTimeout <= 0 || d.ReadTimeout <= 0 || d.WriteTimeout <= 0 || d.HandshakeTimeout <= 0 {
		t.Errorf("defaults %+v", d)
	}
	srv := connlimit.Config{}.HTTPServer(http.NotFoundHandler())
	if srv.IdleTimeout <= 0 || srv.ReadTimeout <= 0 || srv.WriteTimeout <= 0 || srv.ReadHeaderTimeout <= 0 {
		t.Errorf("HTTP server without every timeout: %+v", srv)
	}
	for _, bad := range []connlimit.Config{{MaxConnections: -1}, {IdleTimeout: -time.Second}, {HandshakeTimeout: -1}} {
		if bad.Validate() == nil {
			t.Errorf("Validate(%+v) = nil", bad)
		}
		if _, err := bad.Listen("tcp", "127.0.0.1:0"); err == nil {
			t.Errorf("Listen with %+v did not fail", bad)
		}
	}
}
