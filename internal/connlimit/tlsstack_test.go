package connlimit_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"math/big"
	"net"
	"runtime"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/trustmesh/trustmesh/internal/connlimit"
)

// TestGRPCTLSOptionsFreeTheDecodingsStack: over a real TLS gRPC server, a
// stream's receiving goroutine that decoded a deep message and waits for
// the next one holds that decoding's stack with GRPCOptions, and not with
// GRPCTLSOptions, the CA and xDS port's options, which decode aside. It
// fails if GRPCTLSOptions stops installing the decode-aside codec, which
// TestDecodeAsideKeepsTheCallersStack, testing the codec alone, does not
// see.
func TestGRPCTLSOptionsFreeTheDecodingsStack(t *testing.T) {
	cert, pool := selfSignedLoopback(t)
	// A Value nested 400 lists deep: protobuf decodes it recursively,
	// hundreds of kilobytes of stack.
	v := structpb.NewStringValue("leaf")
	for range 400 {
		v = structpb.NewListValue(&structpb.ListValue{Values: []*structpb.Value{v}})
	}
	const streams = 16
	// held returns how much more stack the process holds with the streams
	// parked, each after receiving v, than before they opened.
	held := func(opts []grpc.ServerOption) int64 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		received := make(chan struct{}, streams)
		g := grpc.NewServer(append([]grpc.ServerOption{grpc.Creds(credentials.NewTLS(&tls.Config{
			Certificates: []tls.Certificate{cert}, MinVersion: tls.VersionTLS13,
		}))}, opts...)...)
		g.RegisterService(&grpc.ServiceDesc{ServiceName: "trustmesh.test.Park", HandlerType: (*any)(nil),
			Streams: []grpc.StreamDesc{{StreamName: "Park", ServerStreams: true, ClientStreams: true,
				Handler: func(_ any, s grpc.ServerStream) error {
					if err := s.RecvMsg(&structpb.Value{}); err != nil {
						return err
					}
					received <- struct{}{}
					return s.RecvMsg(&structpb.Value{}) // parks until the client goes
				}}}}, struct{}{})
		go func() { _ = g.Serve(l) }()
		defer g.Stop()
		conn, err := grpc.NewClient(l.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool})))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		var ms runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&ms)
		before := int64(ms.StackInuse)
		for range streams {
			s, err := conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, "/trustmesh.test.Park/Park")
			if err != nil {
				t.Fatal(err)
			}
			if err := s.SendMsg(v); err != nil {
				t.Fatal(err)
			}
		}
		for range streams {
			select {
			case <-received:
			case <-ctx.Done():
				t.Fatal("the server did not receive every stream's message")
			}
		}
		runtime.GC()
		runtime.GC()
		runtime.ReadMemStats(&ms)
		return int64(ms.StackInuse) - before
	}
	plain := held(connlimit.Config{}.GRPCOptions())
	tlsOpts := held(connlimit.Config{}.GRPCTLSOptions())
	t.Logf("stack held with %d streams parked after a deep message: GRPCOptions %d kB, GRPCTLSOptions %d kB", streams, plain>>10, tlsOpts>>10)
	// Decoding in place leaves each receiving goroutine at least 128 KiB.
	if plain < streams*128<<10 {
		t.Fatalf("GRPCOptions held only %d kB: the message is not deep enough to tell", plain>>10)
	}
	if tlsOpts*4 > plain {
		t.Fatalf("GRPCTLSOptions: parked streams hold %d kB of stack, GRPCOptions %d kB: want the decoding's stack freed", tlsOpts>>10, plain>>10)
	}
}

// selfSignedLoopback is a self-signed P-256 server certificate for
// 127.0.0.1, and a pool that trusts it.
func selfSignedLoopback(t *testing.T) (tls.Certificate, *x509.CertPool) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "connlimit"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, KeyUsage: x509.KeyUsageDigitalSignature,
		ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	leaf, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(leaf)
	return tls.Certificate{Certificate: [][]byte{der}, PrivateKey: key, Leaf: leaf}, pool
}
