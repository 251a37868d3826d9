package connlimit_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"fmt"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// TestGRPCTLSOptionsCarryMessagesIntact: with GRPCTLSOptions the framer
// reads straight from the TLS connection (no read buffer of its own) and
// messages are decoded aside; messages of every size, from empty to
// several TLS records and HTTP/2 frames, on concurrent streams of one
// connection, arrive intact and in order.
func TestGRPCTLSOptionsCarryMessagesIntact(t *testing.T) {
	cert, pool := selfSignedLoopback(t)

	cfg := connlimit.Config{}
	l, err := cfg.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	g := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{
		Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13,
	}))}, cfg.GRPCTLSOptions()...)...)
	g.RegisterService(&grpc.ServiceDesc{
		ServiceName: "trustmesh.test.Echo", HandlerType: (*any)(nil),
		Streams: []grpc.StreamDesc{{StreamName: "Echo", ServerStreams: true, ClientStreams: true,
			Handler: func(_ any, s grpc.ServerStream) error {
				for {
					m := &wrapperspb.BytesValue{}
					if err := s.RecvMsg(m); err != nil {
						return nil
					}
					if err := s.SendMsg(m); err != nil {
						return err
					}
				}
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
	conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS13})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	sizes := []int{0, 1, 9, 4095, 4096, 16383, 16384, 16385, 65535, 70000, 200000}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for s := range 4 {
		wg.Go(func() {
			stream, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/trustmesh.test.Echo/Echo")
			if err != nil {
				errs <- err
				return
			}
			for i, n := range sizes {
				want := bytes.Repeat([]byte{byte(s*16 + i)}, n)
				if err := stream.SendMsg(wrapperspb.Bytes(want)); err != nil {
					errs <- err
					return
				}
				got := &wrapperspb.BytesValue{}
				if err := stream.RecvMsg(got); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(got.GetValue(), want) {
					errs <- fmt.Errorf("stream %d: a %d-byte message came back as %d different bytes", s, n, len(got.GetValue()))
					return
				}
			}
			_ = stream.CloseSend()
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}
