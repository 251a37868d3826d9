package rotation

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// rotationStatus is what `ca rotate --status -o json` prints, the parts the
// tests read.
type rotationStatus struct {
	Active  int `json:"active"`
	Next    int `json:"next"`
	Tainted []struct {
		Role   string `json:"role"`
		Serial string `json:"serial"`
	} `json:"tainted"`
	CA []struct {
		Role   string `json:"role"`
		Serial string `json:"serial"`
		State  string `json:"state"`
	} `json:"ca"`
}

func status(t *testing.T, dataDir string) rotationStatus {
	t.Helper()
	var st rotationStatus
	out := cli(t, "ca", "rotate", "--status", "-o", "json", "--data-dir", dataDir)
	if err := json.Unmarshal([]byte(out), &st); err != nil {
		t.Fatalf("ca rotate --status: %v\n%s", err, out)
	}
	return st
}

// serialOf returns the serial of the CA certificate of role in state.
func (st rotationStatus) serialOf(role, state string) string {
	for _, c := range st.CA {
		if c.Role == role && c.State == state {
			return c.Serial
		}
	}
	return ""
}

func sameSerial(c *x509.Certificate, hex string) bool {
	n, ok := new(big.Int).SetString(hex, 16)
	return ok && c.SerialNumber.Cmp(n) == 0
}

// traffic counts mTLS exchanges between workloads, each on a new
// connection with a full handshake, verified by go-spiffe against the
// bundle the workload's own agent serves.
type traffic struct {
	ok, failed atomic.Int64
	mu         sync.Mutex
	failures   []string
	stopped    atomic.Bool
	wg         sync.WaitGroup
}

func (tr *traffic) fail(err error) {
	tr.failed.Add(1)
	tr.mu.Lock()
	defer tr.mu.Unlock()
	if len(tr.failures) < 20 {
		tr.failures = append(tr.failures, fmt.Sprintf("%s %v", time.Now().Format(time.RFC3339Nano), err))
	}
}

func (tr *traffic) serve(t *testing.T, src *workloadapi.X509Source) string {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	cfg := tlsconfig.MTLSServerConfig(src, src, tlsconfig.AuthorizeMemberOf(td))
	var conns sync.WaitGroup
	t.Cleanup(func() { lis.Close(); conns.Wait() })
	go func() {
		for {
			c, err := lis.Accept()
			if err != nil {
				return
			}
			conns.Add(1)
			go func() {
				defer conns.Done()
				defer c.Close()
				_ = c.SetDeadline(time.Now().Add(30 * time.Second))
				tc := tls.Server(c, cfg)
				line, err := bufio.NewReader(tc).ReadString('\n')
				if err == nil {
					_, err = tc.Write([]byte(line))
				}
				if err != nil && !tr.stopped.Load() {
					tr.fail(fmt.Errorf("server: %w", err))
				}
			}()
		}
	}()
	return lis.Addr().String()
}

func (tr *traffic) call(src *workloadapi.X509Source, addr string) {
	cfg := tlsconfig.MTLSClientConfig(src, src, tlsconfig.AuthorizeMemberOf(td))
	tr.wg.Add(1)
	go func() {
		defer tr.wg.Done()
		for !tr.stopped.Load() {
			if err := exchange(cfg, addr); err != nil {
				tr.fail(fmt.Errorf("client to %s: %w", addr, err))
			} else {
				tr.ok.Add(1)
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
}

func (tr *traffic) stop() { tr.stopped.Store(true); tr.wg.Wait() }

func exchange(cfg *tls.Config, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(30 * time.Second))
	if _, err := conn.Write([]byte("ping\n")); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if got != "ping\n" {
		return fmt.Errorf("echo %q", got)
	}
	return nil
}

// watchBundle opens the CA's bundle stream as an agent does and returns
// its first message.
func watchBundle(t *testing.T, caAddr, bundleFile string) *cav1.TrustBundle {
	t.Helper()
	pemRoots, err := os.ReadFile(bundleFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pemRoots) {
		t.Fatal("no roots in the CA bundle")
	}
	conn, err := grpc.NewClient(caAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: pool, ServerName: "127.0.0.1"})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	stream, err := cav1.NewTrustBundleServiceClient(conn).WatchBundle(ctx, &cav1.WatchBundleRequest{})
	if err != nil {
		t.Fatal(err)
	}
	msg, err := stream.Recv()
	if err != nil {
		t.Fatalf("bundle stream: %v", err)
	}
	return msg
}

// TestTaintSwitchesEveryAgentAtOnce is issue 14's forced rotation with
// several agents and traffic, all real processes: serve, three agents on
// one-hour certificates (half-life far away), each workload calling the
// next over mTLS without pause. After `ca rotate --taint`, the bundle
// stream names the tainted intermediate, every agent serves an SVID under
// the new intermediate within seconds, no call fails, and the journal
// records taint, prepare and activate.
func TestTaintSwitchesEveryAgentAtOnce(t *testing.T) {
	if testing.Short() {
		t.Skip("runs trustmesh serve and three agents")
	}
	dir := tempDir(t, "faults-rotation-taint-")
	s := startServe(t, filepath.Join(dir, "data"))
	bundle := s.bundleFile(t, dir)
	before := status(t, s.dataDir)
	oldInter := before.serialOf("intermediate", "active")
	if oldInter == "" {
		t.Fatalf("no active intermediate: %+v", before)
	}
	if msg := watchBundle(t, s.caAddr, bundle); len(msg.GetTaintedAuthorities()) != 0 {
		t.Fatalf("the bundle names %d tainted authorities before any taint", len(msg.GetTaintedAuthorities()))
	}

	const agents = 3
	srcs := make([]*workloadapi.X509Source, agents)
	for i := range agents {
		id := spiffeid.RequireFromPath(td, fmt.Sprintf("/ns/default/sa/w%d", i))
		tokenFile := filepath.Join(dir, fmt.Sprintf("token%d", i))
		token := strings.TrimSpace(cli(t, "ca", "token", "create", "--data-dir", s.dataDir, "--spiffe-id", id.String(), "--ttl", "10m"))
		if err := os.WriteFile(tokenFile, []byte(token), 0o600); err != nil {
			t.Fatal(err)
		}
		sock := filepath.Join(dir, fmt.Sprintf("agent%d.sock", i))
		start(t, fmt.Sprintf("agent %d", i), "agent", "--ca-address", s.caAddr, "--ca-bundle", bundle,
			"--join-token-file", tokenFile, "--socket", sock, "--listen-monitoring", "", "--cert-ttl", "1h")
		eventually(t, 60*time.Second, "agent socket", func() bool {
			c, err := net.Dial("unix", sock)
			if err == nil {
				c.Close()
			}
			return err == nil
		})
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		src, err := workloadapi.NewX509Source(ctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+sock)))
		cancel()
		if err != nil {
			t.Fatalf("agent %d: X509 source: %v", i, err)
		}
		t.Cleanup(func() { src.Close() })
		srcs[i] = src
	}
	var tr traffic
	addrs := make([]string, agents)
	for i, src := range srcs {
		addrs[i] = tr.serve(t, src)
	}
	for i, src := range srcs {
		tr.call(src, addrs[(i+1)%agents])
	}
	defer tr.stop()
	eventually(t, 30*time.Second, "traffic flowing", func() bool { return tr.ok.Load() >= 30 })
	for i, src := range srcs {
		svid, err := src.GetX509SVID()
		if err != nil || len(svid.Certificates) < 2 || !sameSerial(svid.Certificates[1], oldInter) {
			t.Fatalf("agent %d does not start under intermediate %s: %v", i, oldInter, err)
		}
	}

	cli(t, "ca", "rotate", "--taint", "--data-dir", s.dataDir)
	tainted := time.Now()
	after := status(t, s.dataDir)
	newInter := after.serialOf("intermediate", "active")
	if newInter == "" || newInter == oldInter || len(after.Tainted) != 1 || after.Tainted[0].Serial != oldInter {
		t.Fatalf("after --taint: %+v, want a new active intermediate and %s tainted", after, oldInter)
	}

	// The CA picks the taint up at its next rotation check (1 s); the
	// stream then carries it.
	eventually(t, 10*time.Second, "the bundle stream naming the tainted intermediate", func() bool {
		msg := watchBundle(t, s.caAddr, bundle)
		for _, der := range msg.GetTaintedAuthorities() {
			if c, err := x509.ParseCertificate(der); err == nil && sameSerial(c, oldInter) {
				return true
			}
		}
		return false
	})
	// Every agent renews at once: half-life is 30 minutes away.
	for i, src := range srcs {
		eventually(t, 15*time.Second, fmt.Sprintf("agent %d serving an SVID under the new intermediate", i), func() bool {
			svid, err := src.GetX509SVID()
			return err == nil && len(svid.Certificates) > 1 && sameSerial(svid.Certificates[1], newInter)
		})
	}
	switched := time.Since(tainted)
	// Calls go on across the switch, each handshake now on new leaves.
	okAtSwitch := tr.ok.Load()
	eventually(t, 30*time.Second, "traffic after the switch", func() bool { return tr.ok.Load() >= okAtSwitch+30 })
	tr.stop()
	t.Logf("every agent under the new intermediate %.1fs after ca rotate --taint; %d calls succeeded, %d failed", switched.Seconds(), tr.ok.Load(), tr.failed.Load())
	if n := tr.failed.Load(); n != 0 {
		t.Errorf("%d calls failed across the forced rotation:\n%s", n, strings.Join(tr.failures, "\n"))
	}

	log := cli(t, "audit", "log", "--data-dir", s.dataDir)
	for _, want := range []string{
		oldInter + " .*taint intermediate",
		newInter + " .*prepare intermediate",
		newInter + " .*activate intermediate",
	} {
		if !matchLine(log, want) {
			t.Errorf("the journal has no line matching %q:\n%s", want, log)
		}
	}
}
