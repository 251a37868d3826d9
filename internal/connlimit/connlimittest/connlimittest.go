// Package connlimittest checks, from the client side, that a running server
// enforces its connlimit.Config: it closes idle and silent connections, and
// serves no more than its cap at once. Servers' tests run it with short
// timeouts and a small cap in their configuration, so nothing sleeps for
// minutes and no test exhausts file descriptors.
package connlimittest

import (
	"bufio"
	"crypto/tls"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"testing"
	"time"

	"golang.org/x/net/http2"
)

// Exchange proves that the server serves c; it returns the connection to
// keep open (c, or a TLS connection over it).
type Exchange func(c net.Conn) (net.Conn, error)

// HTTP makes one GET request for path and reads the whole response,
// leaving the connection open (keep-alive). A nil tlsCfg means plaintext.
func HTTP(tlsCfg *tls.Config, path string) Exchange {
	return func(c net.Conn) (net.Conn, error) {
		if tlsCfg != nil {
			tc := tls.Client(c, tlsCfg)
			if err := tc.Handshake(); err != nil {
				return nil, fmt.Errorf("TLS handshake: %w", err)
			}
			c = tc
		}
		if _, err := fmt.Fprintf(c, "GET %s HTTP/1.1\r\nHost: test\r\n\r\n", path); err != nil {
			return nil, err
		}
		resp, err := http.ReadResponse(bufio.NewReader(c), nil)
		if err != nil {
			return nil, fmt.Errorf("HTTP response: %w", err)
		}
		defer resp.Body.Close()
		if _, err := io.Copy(io.Discard, resp.Body); err != nil {
			return nil, err
		}
		if resp.Close {
			return nil, errors.New("the server closed the connection after one request")
		}
		return c, nil
	}
}

// GRPC completes the TLS handshake (nil tlsCfg: none) and the HTTP/2
// preface that a gRPC client sends, and starts no RPC. Afterwards the
// connection answers the server's pings, as a client's would.
func GRPC(tlsCfg *tls.Config) Exchange {
	return func(c net.Conn) (net.Conn, error) {
		if tlsCfg != nil {
			cfg := tlsCfg.Clone()
			cfg.NextProtos = []string{"h2"}
			tc := tls.Client(c, cfg)
			if err := tc.Handshake(); err != nil {
				return nil, fmt.Errorf("TLS handshake: %w", err)
			}
			c = tc
		}
		if _, err := io.WriteString(c, http2.ClientPreface); err != nil {
			return nil, err
		}
		fr := http2.NewFramer(c, c)
		if err := fr.WriteSettings(); err != nil {
			return nil, err
		}
		// The server's SETTINGS frame shows it took the connection.
		f, err := fr.ReadFrame()
		if err != nil {
			return nil, fmt.Errorf("HTTP/2 server preface: %w", err)
		}
		if _, ok := f.(*http2.SettingsFrame); !ok {
			return nil, fmt.Errorf("HTTP/2 server preface: %v, want SETTINGS", f.Header())
		}
		if err := fr.WriteSettingsAck(); err != nil {
			return nil, err
		}
		return &h2Conn{Conn: c, fr: fr}, nil
	}
}

// h2Conn is an HTTP/2 client connection with no streams.
type h2Conn struct {
	net.Conn
	fr *http2.Framer
}

// drain reads frames until the connection ends, answering pings (a server
// closing an idle connection gracefully pings before its last GOAWAY).
func (c *h2Conn) drain() error {
	for {
		f, err := c.fr.ReadFrame()
		if err != nil {
			return err
		}
		if p, ok := f.(*http2.PingFrame); ok && !p.IsAck() {
			if err := c.fr.WritePing(true, p.Data); err != nil {
				return err
			}
		}
	}
}

// Silent opens the connection and sends nothing at all.
func Silent(c net.Conn) (net.Conn, error) { return c, nil }

// ClosesIdle dials addr, runs ex, then expects the server to close the
// connection within the given time, as an idle (or silent) connection.
func ClosesIdle(t testing.TB, addr string, ex Exchange, within time.Duration) {
	t.Helper()
	c := dial(t, addr)
	defer c.Close()
	c.SetDeadline(time.Now().Add(10 * time.Second))
	cc, err := ex(c)
	if err != nil {
		t.Fatalf("%s: %v", addr, err)
	}
	start := time.Now()
	cc.SetDeadline(start.Add(within))
	// Read until the server closes; it may send a GOAWAY first.
	if h2, ok := cc.(*h2Conn); ok {
		err = h2.drain()
	} else {
		_, err = io.Copy(io.Discard, cc)
	}
	if errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatalf("%s: an idle connection was still open after %s", addr, within)
	}
	t.Logf("%s: the server closed an idle connection after %s (%v)", addr, time.Since(start).Round(time.Millisecond), err)
}

// CapHolds opens max connections to addr that each complete ex and stay
// open, then one more: the extra one must not be served while the others
// are open, and must be served once one of them closes.
func CapHolds(t testing.TB, addr string, max int, ex Exchange) {
	t.Helper()
	open := make([]net.Conn, 0, max)
	defer func() {
		for _, c := range open {
			c.Close()
		}
	}()
	for i := range max {
		c := dial(t, addr)
		open = append(open, c)
		c.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := ex(c); err != nil {
			t.Fatalf("%s: connection %d of %d: %v", addr, i+1, max, err)
		}
		c.SetDeadline(time.Time{})
	}
	extra := dial(t, addr) // the kernel accepts it; the server must not
	defer extra.Close()
	extra.SetDeadline(time.Now().Add(20 * time.Second))
	served := make(chan error, 1)
	go func() {
		_, err := ex(extra)
		served <- err
	}()
	select {
	case err := <-served:
		t.Fatalf("%s: connection %d was served (%v) while %d were open", addr, max+1, err, max)
	case <-time.After(500 * time.Millisecond):
	}
	open[0].Close()
	open = open[1:]
	select {
	case err := <-served:
		if err != nil {
			t.Fatalf("%s: connection %d, once one closed: %v", addr, max+1, err)
		}
	case <-time.After(10 * time.Second):
		t.Fatalf("%s: connection %d was not served after another closed", addr, max+1)
	}
}

func dial(t testing.TB, addr string) net.Conn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, 5*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	return c
}
