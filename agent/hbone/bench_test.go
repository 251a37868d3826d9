package hbone

import (
	"context"
	"encoding/binary"
	"io"
	"net"
	"testing"
)

// The benchmarks set HBONE over loopback beside plain TCP over the same
// loopback, so the figures show what the tunnel adds (two TLS 1.3 + HTTP/2
// ends, client and server in one process):
//
//	go test -run '^$' -bench . -benchmem ./agent/hbone

// sinkHandle reads a tunnel to its end and answers with the byte count, so
// the writer knows every byte arrived.
func sinkHandle(c io.ReadWriteCloser) {
	defer c.Close()
	n, _ := io.Copy(io.Discard, c)
	binary.Write(c, binary.BigEndian, n)
}

func echoHandle(c io.ReadWriteCloser) {
	defer c.Close()
	io.Copy(c, c)
}

// tcpServer serves handle on plain loopback TCP until the benchmark ends.
func tcpServer(b *testing.B, handle func(io.ReadWriteCloser)) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			go handle(c)
		}
	}()
	b.Cleanup(func() { l.Close(); <-done })
	return l.Addr().String()
}

type benchTarget struct {
	name string
	dial func(b *testing.B) net.Conn
}

func targets(b *testing.B, handle func(io.ReadWriteCloser)) []benchTarget {
	e := newEnv(b)
	cfg := e.serverConfig()
	cfg.Handle = func(_ context.Context, t *Tunnel) { handle(t) }
	hboneAddr := serve(b, cfg)
	tcpAddr := tcpServer(b, handle)
	pool := &Pool{}
	b.Cleanup(func() { pool.Close() })
	key := PoolKey{Source: srcID, Peer: dstID, Addr: hboneAddr}
	dialHBONE := func(ctx context.Context) (net.Conn, error) {
		var d net.Dialer
		return d.DialContext(ctx, "tcp", hboneAddr)
	}
	return []benchTarget{
		{"tcp", func(b *testing.B) net.Conn {
			c, err := net.Dial("tcp", tcpAddr)
			if err != nil {
				b.Fatal(err)
			}
			return c
		}},
		{"hbone", func(b *testing.B) net.Conn {
			c, err := net.Dial("tcp", hboneAddr)
			if err != nil {
				b.Fatal(err)
			}
			t, err := Dial(context.Background(), c, e.dialConfig("10.0.0.1:80"))
			if err != nil {
				b.Fatal(err)
			}
			return t
		}},
		{"hbone-pooled", func(b *testing.B) net.Conn {
			t, err := pool.Dial(context.Background(), key, dialHBONE, e.dialConfig("10.0.0.1:80"))
			if err != nil {
				b.Fatal(err)
			}
			return t
		}},
	}
}

// BenchmarkThroughput is one stream's bulk transfer (64 KiB writes).
func BenchmarkThroughput(b *testing.B) {
	for _, tg := range targets(b, sinkHandle) {
		b.Run(tg.name, func(b *testing.B) {
			chunk := make([]byte, 64<<10)
			b.SetBytes(int64(len(chunk)))
			c := tg.dial(b)
			defer c.Close()
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(chunk); err != nil {
					b.Fatal(err)
				}
			}
			if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
				b.Fatal(err)
			}
			var n int64
			if err := binary.Read(c, binary.BigEndian, &n); err != nil || n != int64(b.N*len(chunk)) {
				b.Fatalf("sink got %d bytes (%v), want %d", n, err, b.N*len(chunk))
			}
		})
	}
}

// BenchmarkRoundTrip is a 64-byte request and its echo on an open
// connection: the latency a small exchange pays.
func BenchmarkRoundTrip(b *testing.B) {
	for _, tg := range targets(b, echoHandle) {
		b.Run(tg.name, func(b *testing.B) {
			c := tg.dial(b)
			defer c.Close()
			msg, got := make([]byte, 64), make([]byte, 64)
			b.ResetTimer()
			for range b.N {
				if _, err := c.Write(msg); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, got); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkSetup is a new connection, one byte echoed, and close: the
// connection setup rate (for HBONE: TCP, TLS 1.3 with both SVIDs verified,
// HTTP/2 settings and the CONNECT).
func BenchmarkSetup(b *testing.B) {
	for _, tg := range targets(b, echoHandle) {
		b.Run(tg.name, func(b *testing.B) {
			one := make([]byte, 1)
			for range b.N {
				c := tg.dial(b)
				if _, err := c.Write(one); err != nil {
					b.Fatal(err)
				}
				if _, err := io.ReadFull(c, one); err != nil {
					b.Fatal(err)
				}
				c.Close()
			}
		})
	}
}
