package adversary

import (
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync"
	"testing"
	"time"
)

const (
	// defaultHandshakeTimeout is connlimit's.
	defaultHandshakeTimeout = 10 * time.Second
	// connCap is the cap the connection attack sets with --max-connections.
	connCap = 32
)

// openFDs counts the server process's open file descriptors.
func (s *server) openFDs(t *testing.T) int {
	t.Helper()
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", s.cmd.Process.Pid))
	if err != nil {
		t.Skipf("cannot count the server's file descriptors: %v", err)
	}
	return len(ents)
}

// closedWithin reports whether the peer closes c within d.
func closedWithin(c net.Conn, d time.Duration) bool {
	_ = c.SetReadDeadline(time.Now().Add(d))
	_, err := io.Copy(io.Discard, c)
	if ne, ok := err.(net.Error); ok && ne.Timeout() {
		return false
	}
	return true
}

// TestSilentConnectionsAreClosed (class 8): a connection that never
// completes its handshake (TLS, HTTP/2 preface or request headers) is
// closed on every port.
func TestSilentConnectionsAreClosed(t *testing.T) {
	s := shared(t)
	conns := map[string]net.Conn{}
	for name, addr := range map[string]string{"CA": s.ca, "authz": s.authz, "bundle endpoint": s.bundle, "monitoring": s.monitoring} {
		c, err := net.DialTimeout("tcp", addr, 5*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		conns[name] = c
	}
	watchClosed(t, conns, defaultHandshakeTimeout+10*time.Second)
}

// watchClosed fails for each connection the server keeps open past limit;
// all are watched at once.
func watchClosed(t *testing.T, conns map[string]net.Conn, limit time.Duration) {
	t.Helper()
	var wg sync.WaitGroup
	for name, c := range conns {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if !closedWithin(c, limit) {
				t.Errorf("%s: still open after %s", name, limit)
			}
		}()
	}
	wg.Wait()
}

// TestConnectionCap (class 8): three times the connection cap held open
// on each port cost the server no more than the cap in file descriptors,
// and legitimate clients are served once the attacker lets go.
func TestConnectionCap(t *testing.T) {
	s := start(t, serveConfig{policies: map[string][]byte{"paths.yaml": policyFiles["paths.yaml"]},
		args: []string{"--max-connections", fmt.Sprint(connCap)}})
	for name, addr := range map[string]string{"CA": s.ca, "authz": s.authz, "bundle endpoint": s.bundle, "monitoring": s.monitoring} {
		t.Run(name, func(t *testing.T) {
			before := s.openFDs(t)
			var held []net.Conn
			defer func() {
				for _, c := range held {
					c.Close()
				}
			}()
			for range 3 * connCap {
				c, err := net.DialTimeout("tcp", addr, 2*time.Second)
				if err != nil {
					break // the accept queue is full: the cap holds
				}
				held = append(held, c)
			}
			time.Sleep(500 * time.Millisecond) // let the server accept what it will
			if grown := s.openFDs(t) - before; grown > connCap+4 {
				t.Errorf("%d connections held the server's descriptors up by %d, cap %d", len(held), grown, connCap)
			}
		})
	}
	// Once the attacker lets go, the ports serve again.
	deadline := time.Now().Add(20 * time.Second)
	for {
		code, err := s.get("/healthz")
		if err == nil && code == http.StatusOK {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("monitoring after the attack: %d, %v", code, err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	s.legitimate(t)
}
