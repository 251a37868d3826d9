package adversary

import (
	"bufio"
	"crypto/tls"
	"io"
	"net"
	"net/http"
	"testing"
	"time"
)

// idleTimeoutFlag makes the HTTP idle timeout short enough to test.
const (
	idleTimeoutFlag = "--idle-timeout"
	idleTimeout     = 2 * time.Second
)

// keepAlive sends one HTTP/1.1 keep-alive request on a fresh connection,
// reads the answer, and returns the idle connection.
func keepAlive(t *testing.T, addr string, tlsCfg *tls.Config) net.Conn {
	t.Helper()
	var c net.Conn
	var err error
	if tlsCfg != nil {
		c, err = tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, tlsCfg)
	} else {
		c, err = net.DialTimeout("tcp", addr, 5*time.Second)
	}
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if _, err := io.WriteString(c, "GET / HTTP/1.1\r\nHost: localhost\r\nConnection: keep-alive\r\n\r\n"); err != nil {
		t.Fatal(err)
	}
	_ = c.SetReadDeadline(time.Now().Add(10 * time.Second))
	resp, err := http.ReadResponse(bufio.NewReader(c), nil)
	if err != nil {
		t.Fatal(err)
	}
	_, _ = io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if resp.Close {
		t.Fatal("the server closed the connection at once; the attack needs a keep-alive connection")
	}
	return c
}

// TestIdleConnectionsAreClosed (class 8): the bundle endpoint and the
// monitoring port close idle keep-alive connections.
func TestIdleConnectionsAreClosed(t *testing.T) {
	s := start(t, serveConfig{args: []string{idleTimeoutFlag, idleTimeout.String()}})
	bundleTLS := s.clientTLS(nil)
	bundleTLS.NextProtos = []string{"http/1.1"}
	watchClosed(t, map[string]net.Conn{
		"bundle endpoint": keepAlive(t, s.bundle, bundleTLS),
		"monitoring":      keepAlive(t, s.monitoring, nil),
	}, idleTimeout+5*time.Second)
}
