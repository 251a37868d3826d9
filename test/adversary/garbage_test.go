package adversary

import (
	"bytes"
	"crypto/rand"
	"crypto/tls"
	"errors"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"
	"google.golang.org/grpc/codes"
)

// captureConn records what a TLS client writes and fails every read, so
// that a ClientHello can be taken without a server.
type captureConn struct {
	net.Conn
	buf bytes.Buffer
}

func (c *captureConn) Write(b []byte) (int, error)      { return c.buf.Write(b) }
func (c *captureConn) Read([]byte) (int, error)         { return 0, io.EOF }
func (c *captureConn) Close() error                     { return nil }
func (c *captureConn) SetDeadline(time.Time) error      { return nil }
func (c *captureConn) SetReadDeadline(time.Time) error  { return nil }
func (c *captureConn) SetWriteDeadline(time.Time) error { return nil }

// clientHello is a real TLS ClientHello offering h2 and http/1.1.
func clientHello(t *testing.T) []byte {
	t.Helper()
	c := &captureConn{}
	_ = tls.Client(c, &tls.Config{ServerName: "localhost", NextProtos: []string{"h2", "http/1.1"}}).Handshake()
	if c.buf.Len() == 0 {
		t.Fatal("no ClientHello captured")
	}
	return c.buf.Bytes()
}

func randomBytes(n int) []byte {
	b := make([]byte, n)
	_, _ = rand.Read(b)
	return b
}

// h2Request is an HTTP/2 connection preface, SETTINGS and a gRPC HEADERS
// frame for path.
func h2Request(t *testing.T, path string) []byte {
	t.Helper()
	var buf bytes.Buffer
	buf.WriteString(http2.ClientPreface)
	fr := http2.NewFramer(&buf, nil)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var hb bytes.Buffer
	enc := hpack.NewEncoder(&hb)
	for _, f := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", path}, {":authority", "localhost"},
		{"content-type", "application/grpc"}, {"te", "trailers"}} {
		_ = enc.WriteField(hpack.HeaderField{Name: f[0], Value: f[1]})
	}
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: hb.Bytes(), EndHeaders: true}); err != nil {
		t.Fatal(err)
	}
	// A gRPC message header announcing 16 MB, then nothing.
	if err := fr.WriteData(1, false, []byte{0, 0, 0xff, 0xff, 0xff}); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// garbage is one way of sending a port what it does not expect.
type garbage struct {
	name string
	// tls: complete a TLS handshake first (with alpn) and send the
	// payload inside it.
	tls  bool
	alpn string
	// payload is written; hold keeps the connection open until the test
	// ends instead of closing it.
	payload func(t *testing.T) []byte
	hold    bool
}

var garbageKinds = []garbage{
	{name: "random bytes", payload: func(*testing.T) []byte { return randomBytes(4096) }},
	{name: "random bytes, held open", hold: true, payload: func(*testing.T) []byte { return randomBytes(64) }},
	{name: "half a TLS handshake, held open", hold: true, payload: clientHello},
	{name: "a ClientHello cut short", payload: func(t *testing.T) []byte { h := clientHello(t); return h[:len(h)/2] }},
	{name: "a TLS record header announcing 16 kB, held open", hold: true, payload: func(*testing.T) []byte { return []byte{0x16, 0x03, 0x01, 0x40, 0x00} }},
	{name: "HTTP/1.1 in plaintext", payload: func(*testing.T) []byte {
		return []byte("GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n")
	}},
	{name: "gRPC preface in plaintext, held open", hold: true, payload: func(t *testing.T) []byte {
		return h2Request(t, "/istio.v1.auth.IstioCertificateService/CreateCertificate")
	}},
	{name: "an endless HTTP/1.1 header", payload: func(*testing.T) []byte {
		return []byte("GET / HTTP/1.1\r\nHost: localhost\r\nX-A: " + strings.Repeat("a", 2<<20))
	}},
	{name: "HTTP/1.1 inside TLS", tls: true, alpn: "http/1.1", payload: func(*testing.T) []byte {
		return []byte("POST /istio.v1.auth.IstioCertificateService/CreateCertificate HTTP/1.1\r\nHost: localhost\r\nContent-Length: 5\r\n\r\nhello")
	}},
	{name: "gRPC inside TLS, a 16 MB message never sent, held open", tls: true, alpn: "h2", hold: true, payload: func(t *testing.T) []byte {
		return h2Request(t, "/envoy.service.auth.v3.Authorization/Check")
	}},
	{name: "random bytes inside TLS", tls: true, alpn: "h2", payload: func(*testing.T) []byte { return randomBytes(4096) }},
}

// send sends g to addr. Errors from the server (resets, refusals) are the
// expected outcome and ignored; only failing to connect at all is
// reported.
func (s *server) send(t *testing.T, addr string, g garbage) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s: %v", addr, err)
	}
	var c net.Conn = conn
	if g.tls {
		tc := tls.Client(conn, &tls.Config{RootCAs: s.roots, ServerName: "localhost", NextProtos: []string{g.alpn}})
		_ = tc.SetDeadline(time.Now().Add(5 * time.Second))
		if err := tc.Handshake(); err != nil {
			// The port wants a client certificate, or another
			// protocol: the garbage goes in plaintext instead.
			conn.Close()
			if conn, err = net.DialTimeout("tcp", addr, 5*time.Second); err != nil {
				t.Fatalf("dial %s: %v", addr, err)
			}
			c = conn
		} else {
			_ = tc.SetDeadline(time.Time{})
			c = tc
		}
	}
	_ = c.SetWriteDeadline(time.Now().Add(2 * time.Second))
	_, _ = c.Write(g.payload(t))
	if g.hold {
		t.Cleanup(func() { c.Close() })
		return
	}
	// Read whatever answer comes, briefly, then hang up.
	_ = c.SetReadDeadline(time.Now().Add(300 * time.Millisecond))
	_, _ = io.Copy(io.Discard, io.LimitReader(c, 1<<20))
	c.Close()
}

// TestGarbageOnEveryPort: random bytes, half handshakes, HTTP on the gRPC
// ports and gRPC on the HTTP ports, some held open; the server stays up
// and serves legitimate clients on every port meanwhile and afterwards.
func TestGarbageOnEveryPort(t *testing.T) {
	s := shared(t)
	ports := map[string]string{"CA": s.ca, "monitoring": s.monitoring, "bundle": s.bundle, "authz": s.authz}
	for name, addr := range ports {
		t.Run(name, func(t *testing.T) {
			for _, g := range garbageKinds {
				s.send(t, addr, g)
			}
			if !s.running() {
				t.Fatalf("the server exited:\n%s", s.lastLog())
			}
			// Legitimate clients on every port, with the garbage
			// connections still held open.
			s.legitimate(t)
		})
	}
}

// legitimate checks that every port serves a real client.
func (s *server) legitimate(t *testing.T) {
	t.Helper()
	if code, err := s.get("/healthz"); err != nil || code != http.StatusOK {
		t.Errorf("monitoring /healthz: %d, %v", code, err)
	}
	c := &http.Client{Timeout: 10 * time.Second, Transport: &http.Transport{TLSClientConfig: s.clientTLS(nil)}}
	resp, err := c.Get("https://" + s.bundle + "/")
	if err != nil {
		t.Errorf("bundle endpoint: %v", err)
	} else {
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("bundle endpoint: %s", resp.Status)
		}
	}
	c.CloseIdleConnections()
	s.enrol(t, td+"/ns/garbage/sa/legit")
	if s.authz != "" {
		if got := s.decide(t, check{dst: "shop", src: webID}); got != codes.OK {
			t.Errorf("authz: decision %s for an allowed request", got)
		}
	}
}

// TestPingFloodIsCutOff: an HTTP/2 client that floods the gRPC ports with
// PINGs is sent away (GOAWAY, then the connection closes), instead of
// costing the server a reply per ping forever.
func TestPingFloodIsCutOff(t *testing.T) {
	s := shared(t)
	client := s.enrol(t, td+"/ns/garbage/sa/pinger")
	for name, addr := range map[string]string{"CA": s.ca, "authz": s.authz} {
		t.Run(name, func(t *testing.T) {
			cfg := s.clientTLS(client)
			cfg.NextProtos = []string{"h2"}
			c, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
				t.Fatal(err)
			}
			fr := http2.NewFramer(c, c)
			if err := fr.WriteSettings(); err != nil {
				t.Fatal(err)
			}
			// Pings from another goroutine; frames read here.
			stop := make(chan struct{})
			defer close(stop)
			go func() {
				w := http2.NewFramer(c, nil)
				for i := range 10000 {
					select {
					case <-stop:
						return
					default:
					}
					var data [8]byte
					data[0] = byte(i)
					if w.WritePing(false, data) != nil {
						return
					}
					time.Sleep(time.Millisecond)
				}
			}()
			_ = c.SetReadDeadline(time.Now().Add(15 * time.Second))
			for {
				f, err := fr.ReadFrame()
				if err != nil {
					var ne net.Error
					if errors.As(err, &ne) && ne.Timeout() {
						t.Fatal("the server still answers a ping flood after 15s")
					}
					return // closed: cut off
				}
				if ga, ok := f.(*http2.GoAwayFrame); ok {
					t.Logf("GOAWAY %s %q", ga.ErrCode, ga.DebugData())
					return
				}
			}
		})
	}
}
