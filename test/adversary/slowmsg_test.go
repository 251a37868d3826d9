package adversary

import (
	"bufio"
	"crypto/tls"
	"fmt"
	"net"
	"net/http"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/internal/connlimit/connlimittest"
)

// heapInuse reads go_memstats_heap_inuse_bytes off the monitoring port.
func (s *server) heapInuse(t *testing.T) float64 {
	t.Helper()
	resp, err := (&http.Client{Timeout: 10 * time.Second}).Get("http://" + s.monitoring + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_memstats_heap_inuse_bytes "); ok {
			f, err := strconv.ParseFloat(v, 64)
			if err != nil {
				t.Fatal(err)
			}
			return f
		}
	}
	t.Fatal("no go_memstats_heap_inuse_bytes on /metrics")
	return 0
}

// rssMiB is the server's resident set, for the log.
func (s *server) rssMiB() int {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", s.cmd.Process.Pid))
	if err != nil {
		return -1
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "VmRSS:"); ok {
			n, _ := strconv.Atoi(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(v), "kB")))
			return n >> 10
		}
	}
	return -1
}

// heldWhile watches the server's heap for hold and returns the most it
// grew above before; it returns early once the growth passes bound.
func (s *server) heldWhile(t *testing.T, before float64, hold time.Duration, bound float64) float64 {
	t.Helper()
	most := 0.0
	for end := time.Now().Add(hold); time.Now().Before(end); time.Sleep(250 * time.Millisecond) {
		if most = max(most, s.heapInuse(t)-before); most > bound {
			break
		}
	}
	return most
}

func (s *server) dialH2(t *testing.T, addr string, cfg *tls.Config) *connlimittest.SlowPeer {
	t.Helper()
	cfg.NextProtos = []string{"h2"}
	conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", addr, cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return connlimittest.NewSlowPeer(t, conn)
}

// TestSlowMessagesDoNotPinMemory (class 8): a peer with no credentials at
// all opens every stream a connection may have on the CA port and sends
// each request message but its last byte, answering keepalive. The
// server must neither hold MaxMessage for each (before the fix: 1024 x
// 256 KiB, held with no deadline) nor leave the streams past their
// connection's share waiting: they are refused.
func TestSlowMessagesDoNotPinMemory(t *testing.T) {
	s := start(t, serveConfig{})
	const (
		streams = 1024      // the CA port's MaxConcurrentStreams
		size    = 256 << 10 // the CA port's MaxRecvMsgSize
		bound   = 32 << 20  // what one connection with no credentials may pin: 64 arriving x 256 KiB, and slack
	)
	before, rssBefore := s.heapInuse(t), s.rssMiB()
	p := s.dialH2(t, s.ca, s.clientTLS(nil)) // no client certificate
	win, maxStreams := p.Settings()
	t.Logf("server SETTINGS: initial window %d, max concurrent streams %d", win, maxStreams)
	for i := range streams {
		if err := p.OpenPartial(uint32(2*i+1), "/istio.v1.auth.IstioCertificateService/CreateCertificate", size); err != nil {
			t.Fatal(err)
		}
	}
	grew := s.heldWhile(t, before, 6*time.Second, bound)
	open, why := p.Open()
	t.Logf("%d of %d streams still open (the last ended: %s); server heap in use grew by up to %.0f MiB, RSS %d -> %d MiB",
		open, streams, why, grew/(1<<20), rssBefore, s.rssMiB())
	if grew > bound {
		t.Errorf("one connection with no credentials pins %.0f MiB of the CA's heap (bound %d MiB) with %d unfinished messages",
			grew/(1<<20), bound>>20, open)
	}
	if open > 64 {
		t.Errorf("%d unfinished messages on one connection wait on the CA port, want at most 64", open)
	}
}

// TestSlowChecksDoNotPinMemory (class 8): any workload of the mesh (one
// compromised pod) does the same on the ext_authz port. Before the fix
// the port set no stream cap and kept grpc-go's 4 MiB messages: 128
// streams pinned 512 MiB. Now a check is at most 128 KiB, and one
// connection's arriving checks at most 1024 of them.
func TestSlowChecksDoNotPinMemory(t *testing.T) {
	s := start(t, serveConfig{policies: map[string][]byte{"paths.yaml": policyFiles["paths.yaml"]}})
	w := s.enrol(t, webID)
	for _, tc := range []struct {
		name          string
		streams, size int
		bound         float64
	}{
		{"128 streams of 4 MiB", 128, 4 << 20, 32 << 20},
		{"every stream, at the largest check", 1024, 128 << 10, 160 << 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			before, rssBefore := s.heapInuse(t), s.rssMiB()
			p := s.dialH2(t, s.authz, s.clientTLS(w))
			win, maxStreams := p.Settings()
			t.Logf("server SETTINGS: initial window %d, max concurrent streams %d", win, maxStreams)
			for i := range tc.streams {
				if err := p.OpenPartial(uint32(2*i+1), "/envoy.service.auth.v3.Authorization/Check", tc.size); err != nil {
					t.Fatal(err)
				}
			}
			grew := s.heldWhile(t, before, 6*time.Second, tc.bound)
			open, why := p.Open()
			t.Logf("%d of %d streams still open (the last ended: %s); server heap in use grew by up to %.0f MiB, RSS %d -> %d MiB",
				open, tc.streams, why, grew/(1<<20), rssBefore, s.rssMiB())
			if grew > tc.bound {
				t.Errorf("one workload's connection pins %.0f MiB (bound %.0f MiB) of the control plane's heap on the ext_authz port with %d unfinished checks",
					grew/(1<<20), tc.bound/(1<<20), open)
			}
		})
	}
}

// TestSlowHeadersDoNotPinMemory: one unfinished header block per
// connection, a string literal announced at 15 MiB and fed but for its
// last byte over CONTINUATION frames. grpc-go's default accepts header
// lists of 16 MiB and holds the block while it arrives.
func TestSlowHeadersDoNotPinMemory(t *testing.T) {
	s := start(t, serveConfig{})
	const conns, size, bound = 4, 15 << 20, 8 << 20
	before := s.heapInuse(t)
	for c := range conns {
		cfg := s.clientTLS(nil)
		cfg.NextProtos = []string{"h2"}
		conn, err := tls.DialWithDialer(&net.Dialer{Timeout: 5 * time.Second}, "tcp", s.ca, cfg)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		sent, err := connlimittest.NewSlowPeer(t, conn).OpenHeaderBlock(1, size)
		t.Logf("connection %d: %d bytes of the header block sent (%v)", c, sent, err)
	}
	grew := s.heldWhile(t, before, 4*time.Second, bound)
	t.Logf("%d connections with an unfinished 15 MiB header block: heap in use grew by up to %.0f MiB", conns, grew/(1<<20))
	if grew > bound {
		t.Errorf("unfinished header blocks pin %.0f MiB", grew/(1<<20))
	}
}
