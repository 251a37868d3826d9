package hbone

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"golang.org/x/net/http2"
	"golang.org/x/net/http2/hpack"

	"github.com/trustmesh/trustmesh/agent/internal/testca"
	"github.com/trustmesh/trustmesh/test/leakcheck"
)

func TestMain(m *testing.M) { os.Exit(leakcheck.Run(m)) }

var (
	td    = spiffeid.RequireTrustDomainFromString("cluster.local")
	srcID = spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/client")
	dstID = spiffeid.RequireFromString("spiffe://cluster.local/ns/b/sa/server")
)

func tlsCert(s *x509svid.SVID) *tls.Certificate {
	c := &tls.Certificate{PrivateKey: s.PrivateKey, Leaf: s.Certificates[0]}
	for _, x := range s.Certificates {
		c.Certificate = append(c.Certificate, x.Raw)
	}
	return c
}

// env is a CA, a server SVID and a client SVID.
type env struct {
	ca       *testca.Authority
	src, dst *tls.Certificate
}

func newEnv(t testing.TB) *env {
	t.Helper()
	now := time.Now()
	ca := testca.New(t, td, now)
	return &env{
		ca:  ca,
		src: tlsCert(ca.SVID(t, srcID, now.Add(-time.Minute), time.Hour)),
		dst: tlsCert(ca.SVID(t, dstID, now.Add(-time.Minute), time.Hour)),
	}
}

// serverConfig echoes every tunnel and accepts everything.
func (e *env) serverConfig() ServerConfig {
	return ServerConfig{
		Cert:   func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return e.dst, nil },
		Bundle: e.ca.Bundle(),
		Accept: func(context.Context, spiffeid.ID, string, net.Addr) error { return nil },
		Handle: func(_ context.Context, t *Tunnel) {
			defer t.Close()
			io.Copy(t, t)
		},
	}
}

func (e *env) dialConfig(authority string) DialConfig {
	return DialConfig{
		Cert:      func() (*tls.Certificate, error) { return e.src, nil },
		Bundle:    e.ca.Bundle(),
		PeerID:    dstID,
		Authority: authority,
	}
}

// serve runs Serve on loopback until the test ends and returns its address.
func serve(t testing.TB, cfg ServerConfig) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, l, cfg) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Serve: %v", err)
		}
	})
	return l.Addr().String()
}

func dial(t *testing.T, addr string, cfg DialConfig) (net.Conn, error) {
	t.Helper()
	return dialWithin(t, addr, cfg, 10*time.Second)
}

func dialWithin(t *testing.T, addr string, cfg DialConfig, d time.Duration) (net.Conn, error) {
	t.Helper()
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), d)
	defer cancel()
	return Dial(ctx, c, cfg)
}

func mustDial(t *testing.T, addr string, cfg DialConfig) net.Conn {
	t.Helper()
	c, err := dial(t, addr, cfg)
	if err != nil {
		t.Fatalf("Dial: %v", err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func TestEchoAndWhatTheServerSees(t *testing.T) {
	e := newEnv(t)
	type accepted struct {
		peer      spiffeid.ID
		authority string
		remote    net.Addr
	}
	got := make(chan accepted, 1)
	handled := make(chan *Tunnel, 1)
	cfg := e.serverConfig()
	cfg.Accept = func(_ context.Context, peer spiffeid.ID, authority string, remote net.Addr) error {
		got <- accepted{peer, authority, remote}
		return nil
	}
	echo := cfg.Handle
	cfg.Handle = func(ctx context.Context, t *Tunnel) { handled <- t; echo(ctx, t) }
	addr := serve(t, cfg)

	c := mustDial(t, addr, e.dialConfig("[fd00::7]:8080"))
	if _, err := c.Write([]byte("ping")); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 4)
	if _, err := io.ReadFull(c, buf); err != nil || string(buf) != "ping" {
		t.Fatalf("echo = %q, %v", buf, err)
	}
	a := <-got
	if a.peer != srcID || a.authority != "[fd00::7]:8080" || a.remote.String() != c.LocalAddr().String() {
		t.Errorf("Accept saw %v %q %v, want %v %q %v", a.peer, a.authority, a.remote, srcID, "[fd00::7]:8080", c.LocalAddr())
	}
	tun := <-handled
	if tun.Peer != srcID || tun.Authority != "[fd00::7]:8080" || tun.Remote.String() != c.LocalAddr().String() ||
		tun.RemoteAddr().String() != c.LocalAddr().String() || tun.LocalAddr().String() != c.RemoteAddr().String() {
		t.Errorf("Tunnel = %v %q %v (%v -> %v)", tun.Peer, tun.Authority, tun.Remote, tun.RemoteAddr(), tun.LocalAddr())
	}
	cs := c.(interface{ ConnectionState() tls.ConnectionState }).ConnectionState()
	if cs.Version != tls.VersionTLS13 || cs.NegotiatedProtocol != "h2" {
		t.Errorf("TLS %#x ALPN %q, want TLS 1.3 h2", cs.Version, cs.NegotiatedProtocol)
	}
}

// TestWireFormat checks the CONNECT as a peer such as ztunnel reads it:
// classic CONNECT with the authority, none of :path, :scheme or other
// headers.
func TestWireFormat(t *testing.T) {
	e := newEnv(t)
	reqs := make(chan *http.Request, 1)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	srvDone := make(chan struct{})
	go func() {
		defer close(srvDone)
		c, err := l.Accept()
		if err != nil {
			return
		}
		defer c.Close()
		tc := tls.Server(c, &tls.Config{
			Certificates: []tls.Certificate{*e.dst}, NextProtos: []string{"h2"},
			ClientAuth: tls.RequireAnyClientCert,
		})
		if tc.Handshake() != nil {
			return
		}
		(&http2.Server{}).ServeConn(tc, &http2.ServeConnOpts{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			reqs <- r
			w.WriteHeader(http.StatusOK)
		})})
	}()
	c, err := dial(t, l.Addr().String(), e.dialConfig("10.0.0.9:80"))
	if err != nil {
		t.Fatal(err)
	}
	r := <-reqs
	c.Close()
	<-srvDone
	if r.Method != "CONNECT" || r.Host != "10.0.0.9:80" || r.URL.Path != "" || r.URL.Scheme != "" || r.RequestURI != "10.0.0.9:80" {
		t.Errorf("request %s host=%q url=%#v uri=%q", r.Method, r.Host, r.URL, r.RequestURI)
	}
	if len(r.Header) != 0 {
		t.Errorf("headers sent: %v, want none", r.Header)
	}
}

func TestClientRefusesServer(t *testing.T) {
	e := newEnv(t)
	now := time.Now()
	foreign := testca.New(t, spiffeid.RequireTrustDomainFromString("other.example"), now)
	sameNameOtherCA := testca.New(t, td, now)
	for _, tt := range []struct {
		name   string
		cert   *tls.Certificate
		wantID bool // the refusal is ErrPeerID: the certificate verified, its ID is wrong
	}{
		{"another workload's SVID", tlsCert(e.ca.SVID(t, spiffeid.RequireFromString("spiffe://cluster.local/ns/b/sa/impostor"), now.Add(-time.Minute), time.Hour)), true},
		{"the ID from another trust domain", tlsCert(foreign.SVID(t, spiffeid.RequireFromString("spiffe://other.example/ns/b/sa/server"), now.Add(-time.Minute), time.Hour)), false},
		{"the ID from a CA outside the bundle", tlsCert(sameNameOtherCA.SVID(t, dstID, now.Add(-time.Minute), time.Hour)), false},
		{"an expired SVID", tlsCert(e.ca.SVID(t, dstID, now.Add(-2*time.Hour), time.Hour)), false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cfg := e.serverConfig()
			cfg.Cert = func(*tls.ClientHelloInfo) (*tls.Certificate, error) { return tt.cert, nil }
			cfg.Accept = func(context.Context, spiffeid.ID, string, net.Addr) error {
				t.Error("Accept called for a client that refused the server")
				return nil
			}
			addr := serve(t, cfg)
			c, err := dial(t, addr, e.dialConfig("10.0.0.1:80"))
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			if !errors.Is(err, ErrHandshake) || errors.Is(err, ErrPeerID) != tt.wantID {
				t.Fatalf("Dial: %v, want ErrHandshake (ErrPeerID %v)", err, tt.wantID)
			}
		})
	}
}

func TestServerRefusesClientCertificate(t *testing.T) {
	e := newEnv(t)
	now := time.Now()
	foreignTD := spiffeid.RequireTrustDomainFromString("other.example")
	foreign := testca.New(t, foreignTD, now)
	sameNameOtherCA := testca.New(t, td, now)
	for name, cert := range map[string]*tls.Certificate{
		"no client certificate":       {},
		"another trust domain":        tlsCert(foreign.SVID(t, spiffeid.RequireFromString("spiffe://other.example/ns/a/sa/client"), now.Add(-time.Minute), time.Hour)),
		"same trust domain, not ours": tlsCert(sameNameOtherCA.SVID(t, srcID, now.Add(-time.Minute), time.Hour)),
		"expired":                     tlsCert(e.ca.SVID(t, srcID, now.Add(-2*time.Hour), time.Hour)),
	} {
		t.Run(name, func(t *testing.T) {
			failed := make(chan error, 1)
			cfg := e.serverConfig()
			cfg.Accept = func(context.Context, spiffeid.ID, string, net.Addr) error {
				t.Error("Accept called for a client without a valid SVID")
				return nil
			}
			cfg.HandshakeFailed = func(_ net.Addr, err error) { failed <- err }
			addr := serve(t, cfg)
			dc := e.dialConfig("10.0.0.1:80")
			dc.Cert = func() (*tls.Certificate, error) { return cert, nil }
			c, err := dial(t, addr, dc)
			if err == nil {
				c.Close()
				t.Fatal("Dial succeeded")
			}
			select {
			case err := <-failed:
				if !errors.Is(err, ErrHandshake) {
					t.Errorf("HandshakeFailed(%v), want ErrHandshake", err)
				}
			case <-time.After(5 * time.Second):
				t.Error("HandshakeFailed not called")
			}
		})
	}
}

func TestRefusals(t *testing.T) {
	e := newEnv(t)
	errNotLocal := errors.New("not a local workload")
	cfg := e.serverConfig()
	cfg.Accept = func(_ context.Context, _ spiffeid.ID, authority string, _ net.Addr) error {
		if authority != "10.0.0.1:80" {
			return errNotLocal
		}
		return nil
	}
	cfg.Handle = func(_ context.Context, tun *Tunnel) {
		defer tun.Close()
		if tun.Authority != "10.0.0.1:80" {
			t.Errorf("Handle called for refused %q", tun.Authority)
		}
	}
	addr := serve(t, cfg)

	t.Run("Accept refuses", func(t *testing.T) {
		_, err := dial(t, addr, e.dialConfig("10.0.0.2:80"))
		var se *StatusError
		if !errors.As(err, &se) || se.Code != http.StatusForbidden {
			t.Fatalf("Dial: %v, want StatusError 403", err)
		}
	})

	// Raw HTTP/2 requests that Dial never sends.
	tc, err := tls.Dial("tcp", addr, &tls.Config{
		InsecureSkipVerify: true, NextProtos: []string{"h2"}, Certificates: []tls.Certificate{*e.src},
	})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{}).NewClientConn(tc)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	for _, tt := range []struct {
		name   string
		method string
		host   string
		want   int
	}{
		{"GET", http.MethodGet, "10.0.0.1:80", http.StatusMethodNotAllowed},
		{"POST", http.MethodPost, "10.0.0.1:80", http.StatusMethodNotAllowed},
		{"CONNECT to a name", http.MethodConnect, "example.com:80", http.StatusBadRequest},
		{"CONNECT without port", http.MethodConnect, "10.0.0.1", http.StatusBadRequest},
		{"CONNECT to port 0", http.MethodConnect, "10.0.0.1:0", http.StatusBadRequest},
		{"CONNECT allowed", http.MethodConnect, "10.0.0.1:80", http.StatusOK},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req := &http.Request{Method: tt.method, URL: &url.URL{Scheme: "https", Host: tt.host, Path: "/"}, Host: tt.host, Header: http.Header{}}
			if tt.method == http.MethodConnect {
				req.URL = &url.URL{Host: tt.host}
			}
			resp, err := cc.RoundTrip(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if resp.StatusCode != tt.want {
				t.Errorf("status %d, want %d", resp.StatusCode, tt.want)
			}
		})
	}
}

func TestTLSVersionAndALPN(t *testing.T) {
	e := newEnv(t)
	failed := make(chan error, 10)
	cfg := e.serverConfig()
	cfg.HandshakeFailed = func(_ net.Addr, err error) { failed <- err }
	addr := serve(t, cfg)

	// Clients that are not HBONE clients.
	for _, tt := range []struct {
		name string
		cfg  *tls.Config
	}{
		{"TLS 1.2", &tls.Config{MaxVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}},
		{"ALPN http/1.1", &tls.Config{NextProtos: []string{"http/1.1"}}},
		{"no ALPN", &tls.Config{}},
	} {
		t.Run("server refuses "+tt.name, func(t *testing.T) {
			tt.cfg.InsecureSkipVerify = true
			tt.cfg.Certificates = []tls.Certificate{*e.src}
			c, err := net.Dial("tcp", addr)
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			tc := tls.Client(c, tt.cfg)
			c.SetDeadline(time.Now().Add(5 * time.Second))
			err = tc.Handshake()
			if err == nil {
				// TLS 1.3 clients finish first; the server then closes.
				_, err = tc.Read(make([]byte, 1))
			}
			if err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
				t.Fatalf("connection not refused: %v", err)
			}
			select {
			case err := <-failed:
				if !errors.Is(err, ErrHandshake) {
					t.Errorf("HandshakeFailed(%v)", err)
				}
			case <-time.After(5 * time.Second):
				t.Error("HandshakeFailed not called")
			}
		})
	}

	// Servers that are not HBONE servers.
	for _, tt := range []struct {
		name string
		cfg  *tls.Config
	}{
		{"TLS 1.2", &tls.Config{MaxVersion: tls.VersionTLS12, NextProtos: []string{"h2"}}},
		{"ALPN http/1.1", &tls.Config{NextProtos: []string{"http/1.1"}}},
		{"no ALPN", &tls.Config{}},
	} {
		t.Run("client refuses "+tt.name, func(t *testing.T) {
			tt.cfg.Certificates = []tls.Certificate{*e.dst}
			l, err := net.Listen("tcp", "127.0.0.1:0")
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			done := make(chan struct{})
			go func() {
				defer close(done)
				c, err := l.Accept()
				if err != nil {
					return
				}
				defer c.Close()
				c.SetDeadline(time.Now().Add(5 * time.Second))
				tc := tls.Server(c, tt.cfg)
				if tc.Handshake() == nil {
					io.Copy(io.Discard, tc)
				}
			}()
			_, err = dial(t, l.Addr().String(), e.dialConfig("10.0.0.1:80"))
			if !errors.Is(err, ErrHandshake) {
				t.Errorf("Dial: %v, want ErrHandshake", err)
			}
			<-done
		})
	}
}

func TestConcurrentTunnels(t *testing.T) {
	e := newEnv(t)
	cfg := e.serverConfig()
	cfg.HandshakeTimeout = 2 * time.Minute
	addr := serve(t, cfg)
	const n = 100
	var wg sync.WaitGroup
	errs := make(chan error, n)
	for i := range n {
		wg.Go(func() {
			// 100 handshakes at once on 2 shared cores (and -race) take a while.
			c, err := dialWithin(t, addr, e.dialConfig(fmt.Sprintf("10.0.%d.%d:80", i/250, i%250+1)), 2*time.Minute)
			if err != nil {
				errs <- err
				return
			}
			defer c.Close()
			msg := bytes.Repeat([]byte(fmt.Sprintf("tunnel %03d;", i)), 1000)
			go c.Write(msg)
			got := make([]byte, len(msg))
			if _, err := io.ReadFull(c, got); err != nil {
				errs <- err
				return
			}
			if !bytes.Equal(got, msg) {
				errs <- fmt.Errorf("tunnel %d: got another tunnel's bytes", i)
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// TestLargeTransferAndHalfClose sends 64 MiB through an echo, closes the
// client's half, and reads the 64 MiB back and then io.EOF: the server saw
// the client's end of stream (its echo ended and it closed).
func TestLargeTransferAndHalfClose(t *testing.T) {
	e := newEnv(t)
	addr := serve(t, e.serverConfig())
	c := mustDial(t, addr, e.dialConfig("10.0.0.1:80"))
	const size = 64 << 20
	c.SetDeadline(time.Now().Add(2 * time.Minute)) // fail, not hang, if the end of stream is lost
	sent := sha256.New()
	writeErr := make(chan error, 1)
	go func() {
		_, err := io.Copy(c, io.TeeReader(io.LimitReader(rand.Reader, size), sent))
		if err == nil {
			err = c.(interface{ CloseWrite() error }).CloseWrite()
		}
		writeErr <- err
	}()
	got := sha256.New()
	n, err := io.Copy(got, c)
	if err != nil {
		t.Fatalf("read after %d bytes: %v", n, err)
	}
	if err := <-writeErr; err != nil {
		t.Fatal(err)
	}
	if n != size || !bytes.Equal(got.Sum(nil), sent.Sum(nil)) {
		t.Fatalf("echoed %d bytes, digest match %v", n, bytes.Equal(got.Sum(nil), sent.Sum(nil)))
	}
}

// TestServerAnswersAfterClientHalfClose is the request-then-answer shape:
// the client closes its half, the server reads to io.EOF, answers and
// closes; the client reads the whole answer, then io.EOF.
func TestServerAnswersAfterClientHalfClose(t *testing.T) {
	e := newEnv(t)
	cfg := e.serverConfig()
	cfg.Handle = func(_ context.Context, tun *Tunnel) {
		defer tun.Close()
		req, err := io.ReadAll(tun)
		if err != nil {
			t.Errorf("server read: %v", err)
			return
		}
		fmt.Fprintf(tun, "got %d bytes: %s", len(req), req)
	}
	addr := serve(t, cfg)
	c := mustDial(t, addr, e.dialConfig("10.0.0.1:80"))
	if _, err := io.WriteString(c, "hello"); err != nil {
		t.Fatal(err)
	}
	if err := c.(interface{ CloseWrite() error }).CloseWrite(); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Write([]byte("x")); !errors.Is(err, net.ErrClosed) {
		t.Errorf("Write after CloseWrite: %v, want net.ErrClosed", err)
	}
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	answer, err := io.ReadAll(c)
	if err != nil || string(answer) != "got 5 bytes: hello" {
		t.Fatalf("answer %q, %v", answer, err)
	}
}

// TestServerClosesFirst is a server that answers and closes while the
// client still has its half open (an HTTP/1.0 server, a banner): the client
// reads the answer, then a clean io.EOF, so a proxy can close the tunnel when
// its application closes (the server's Tunnel has no CloseWrite).
func TestServerClosesFirst(t *testing.T) {
	e := newEnv(t)
	cfg := e.serverConfig()
	cfg.Handle = func(_ context.Context, tun *Tunnel) {
		io.WriteString(tun, "banner, bye")
		tun.Close()
	}
	addr := serve(t, cfg)
	c := mustDial(t, addr, e.dialConfig("10.0.0.1:80"))
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	got, err := io.ReadAll(c)
	if err != nil || string(got) != "banner, bye" {
		t.Fatalf("read %q, %v, want the banner then io.EOF", got, err)
	}
}

// TestServerCloseUnblocksWriter: a Handle that closes its tunnel while
// another goroutine's write is stuck (the client reads nothing) returns, and
// the writer gets an error instead of writing after the handler ended.
func TestServerCloseUnblocksWriter(t *testing.T) {
	e := newEnv(t)
	writerDone := make(chan error, 1)
	closed := make(chan time.Duration, 1)
	cfg := e.serverConfig()
	cfg.Handle = func(_ context.Context, tun *Tunnel) {
		go func() {
			chunk := make([]byte, 64<<10)
			for {
				if _, err := tun.Write(chunk); err != nil {
					writerDone <- err
					return
				}
			}
		}()
		time.Sleep(300 * time.Millisecond) // let the writer fill every window
		start := time.Now()
		tun.Close()
		closed <- time.Since(start)
	}
	addr := serve(t, cfg)
	c := mustDial(t, addr, e.dialConfig("10.0.0.1:80"))
	select {
	case d := <-closed:
		if d > 2*time.Second {
			t.Errorf("Close took %v", d)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Close blocked behind a stuck write")
	}
	if err := <-writerDone; err == nil {
		t.Error("writer: no error")
	}
	if _, err := io.Copy(io.Discard, c); err == nil {
		t.Error("client read a reset tunnel to a clean io.EOF")
	}
}

// TestClientCloseEndsServerTunnel: when the client closes, the server's
// blocked Read fails and its context ends, so a splice winds down.
func TestClientCloseEndsServerTunnel(t *testing.T) {
	e := newEnv(t)
	ended := make(chan error, 1)
	inHandle := make(chan struct{})
	cfg := e.serverConfig()
	cfg.Handle = func(ctx context.Context, tun *Tunnel) {
		defer tun.Close()
		close(inHandle)
		_, err := tun.Read(make([]byte, 1))
		if err == nil {
			err = errors.New("read a byte nobody sent")
		}
		select {
		case <-ctx.Done():
		case <-time.After(5 * time.Second):
			t.Error("context not done after the client left")
		}
		ended <- err
	}
	addr := serve(t, cfg)
	c := mustDial(t, addr, e.dialConfig("10.0.0.1:80"))
	<-inHandle
	c.Close()
	select {
	case err := <-ended:
		if err == nil || errors.Is(err, io.EOF) {
			t.Errorf("server read after a client Close: %v, want a reset, not a clean end", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("server still reading after the client closed")
	}
}

func TestServeStopsAndHandlesSeeCancel(t *testing.T) {
	e := newEnv(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	inHandle, handled := make(chan struct{}), make(chan struct{})
	cfg := e.serverConfig()
	cfg.Handle = func(ctx context.Context, tun *Tunnel) {
		defer close(handled)
		defer tun.Close()
		close(inHandle)
		<-ctx.Done()
		time.Sleep(100 * time.Millisecond) // a handler that takes a moment to wind down
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, l, cfg) }()
	c, err := dial(t, l.Addr().String(), e.dialConfig("10.0.0.1:80"))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	<-inHandle
	cancel()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Serve: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Serve did not return")
	}
	select {
	case <-handled:
	default:
		t.Error("Serve returned before its Handle did")
	}
	c.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Read(make([]byte, 1)); err == nil || errors.Is(err, os.ErrDeadlineExceeded) {
		t.Errorf("client read after the server stopped: %v, want the tunnel ended", err)
	}
	if _, err := net.Dial("tcp", l.Addr().String()); err == nil {
		t.Error("listener still open")
	}
}

func TestDialBoundedByContext(t *testing.T) {
	e := newEnv(t)
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	c, err := net.Dial("tcp", l.Addr().String()) // accepted by the kernel, never answered
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 200*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := Dial(ctx, c, e.dialConfig("10.0.0.1:80"))
		done <- err
	}()
	select {
	case err := <-done:
		if err == nil {
			t.Fatal("Dial to a silent peer succeeded")
		}
	case <-time.After(5 * time.Second):
		c.Close()
		<-done
		t.Fatal("Dial outlived its context")
	}
}

func TestConfigErrors(t *testing.T) {
	e := newEnv(t)
	for name, cfg := range map[string]DialConfig{
		"no cert":           {Bundle: e.ca.Bundle(), PeerID: dstID, Authority: "10.0.0.1:80"},
		"no bundle":         {Cert: e.dialConfig("").Cert, PeerID: dstID, Authority: "10.0.0.1:80"},
		"no peer ID":        {Cert: e.dialConfig("").Cert, Bundle: e.ca.Bundle(), Authority: "10.0.0.1:80"},
		"authority is name": {Cert: e.dialConfig("").Cert, Bundle: e.ca.Bundle(), PeerID: dstID, Authority: "svc:80"},
	} {
		a, b := net.Pipe()
		if _, err := Dial(context.Background(), a, cfg); err == nil {
			t.Errorf("%s: Dial accepted the config", name)
		}
		if _, err := b.Write([]byte{1}); err == nil {
			t.Errorf("%s: Dial left the connection open", name)
		}
		b.Close()
	}
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := Serve(context.Background(), l, ServerConfig{}); err == nil {
		t.Error("Serve accepted an empty config")
	}
}

// TestMaxConcurrentStreams: the server advertises its bound to a client
// that holds that many tunnels open.
func TestMaxConcurrentStreams(t *testing.T) {
	e := newEnv(t)
	cfg := e.serverConfig()
	cfg.MaxConcurrentStreams = 2
	release := make(chan struct{})
	cfg.Handle = func(_ context.Context, tun *Tunnel) {
		defer tun.Close()
		<-release
	}
	addr := serve(t, cfg)
	defer close(release)
	tc, err := tls.Dial("tcp", addr, &tls.Config{
		InsecureSkipVerify: true, NextProtos: []string{"h2"}, Certificates: []tls.Certificate{*e.src},
	})
	if err != nil {
		t.Fatal(err)
	}
	cc, err := (&http2.Transport{StrictMaxConcurrentStreams: true}).NewClientConn(tc)
	if err != nil {
		t.Fatal(err)
	}
	defer cc.Close()
	var open []io.Closer
	for range 2 {
		pr, pw := io.Pipe()
		defer pw.Close()
		resp, err := cc.RoundTrip(&http.Request{Method: "CONNECT", URL: &url.URL{Host: "10.0.0.1:80"}, Host: "10.0.0.1:80", Header: http.Header{}, Body: pr, ContentLength: -1})
		if err != nil || resp.StatusCode != 200 {
			t.Fatalf("tunnel: %v", err)
		}
		open = append(open, resp.Body)
	}
	if st := cc.State(); st.MaxConcurrentStreams != 2 || st.StreamsActive != 2 {
		t.Fatalf("client state %+v, want the server's bound 2 and 2 active", st)
	}
	for _, b := range open {
		b.Close()
	}
}

// TestHeaderListBounded sends, frame by frame as a client that ignores the
// server's SETTINGS would, a CONNECT whose header block is larger than the
// bound: the server refuses it (431 or a reset) and never asks Accept.
func TestHeaderListBounded(t *testing.T) {
	e := newEnv(t)
	cfg := e.serverConfig()
	cfg.Accept = func(context.Context, spiffeid.ID, string, net.Addr) error {
		t.Error("Accept called for an oversized header block")
		return nil
	}
	addr := serve(t, cfg)
	tc, err := tls.Dial("tcp", addr, &tls.Config{
		InsecureSkipVerify: true, NextProtos: []string{"h2"}, Certificates: []tls.Certificate{*e.src},
	})
	if err != nil {
		t.Fatal(err)
	}
	defer tc.Close()
	tc.SetDeadline(time.Now().Add(10 * time.Second))
	if _, err := io.WriteString(tc, http2.ClientPreface); err != nil {
		t.Fatal(err)
	}
	fr := http2.NewFramer(tc, tc)
	if err := fr.WriteSettings(); err != nil {
		t.Fatal(err)
	}
	var block bytes.Buffer
	enc := hpack.NewEncoder(&block)
	for _, f := range []hpack.HeaderField{
		{Name: ":method", Value: "CONNECT"},
		{Name: ":authority", Value: "10.0.0.1:80"},
		{Name: "x-padding", Value: strings.Repeat("a", 15000)},
		{Name: "x-padding2", Value: strings.Repeat("b", 15000)},
	} {
		enc.WriteField(f)
	}
	// Under the default 16 KiB frame size: HEADERS then CONTINUATION.
	b := block.Bytes()
	if err := fr.WriteHeaders(http2.HeadersFrameParam{StreamID: 1, BlockFragment: b[:16000], EndHeaders: false}); err != nil {
		t.Fatal(err)
	}
	if err := fr.WriteContinuation(1, true, b[16000:]); err != nil {
		t.Fatal(err)
	}
	fr.ReadMetaHeaders = hpack.NewDecoder(4096, nil)
	for {
		f, err := fr.ReadFrame()
		if err != nil {
			return // the server hung up: refused
		}
		switch f := f.(type) {
		case *http2.MetaHeadersFrame:
			if st := f.PseudoValue("status"); st == "200" {
				t.Fatalf("oversized CONNECT answered %s", st)
			}
			return
		case *http2.RSTStreamFrame, *http2.GoAwayFrame:
			return
		}
	}
}
