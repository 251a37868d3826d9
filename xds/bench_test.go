package xds_test

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"runtime/pprof"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"

	"github.com/trustmesh/trustmesh/mesh"
)

// The benchmark's simulated clients run in a child process (this test
// binary), so that the parent's resident memory is the server's (and the
// in-process CA's), not the clients'.
const (
	benchEnvClients = "TRUSTMESH_XDS_BENCH_CLIENTS"
	benchEnvAddr    = "TRUSTMESH_XDS_BENCH_ADDR"
	benchEnvCerts   = "TRUSTMESH_XDS_BENCH_CERTS"
	benchEnvDelta   = "TRUSTMESH_XDS_BENCH_DELTA"
)

// streamsPerConn is how many simulated clients share a connection: 100,
// or TRUSTMESH_XDS_BENCH_STREAMS_PER_CONN (1 is one connection per
// proxy, as Envoys have, which measures what a connection costs).
var streamsPerConn = func() int {
	if n, err := strconv.Atoi(os.Getenv("TRUSTMESH_XDS_BENCH_STREAMS_PER_CONN")); err == nil && n > 0 {
		return n
	}
	return 100
}()

// benchServices is how many services the benchmark's mesh has: 100, or
// TRUSTMESH_XDS_BENCH_SERVICES.
var benchServices = func() int {
	if n, err := strconv.Atoi(os.Getenv("TRUSTMESH_XDS_BENCH_SERVICES")); err == nil && n > 0 {
		return n
	}
	return 100
}()

// benchMesh has benchServices HTTP services on port 8080, with two
// endpoints each, and extra endpoints on svc-0; and the clients' pods,
// which the server must know to configure them.
func benchMesh(extra, clients int) *mesh.Mesh {
	m := &mesh.Mesh{}
	for i := range clients {
		m.Workloads = append(m.Workloads, &mesh.Workload{Namespace: "bench", Name: fmt.Sprintf("client-%d", i), ServiceAccount: "client",
			ID: spiffeid.RequireFromSegments(td, "ns", "bench", "sa", "client")})
	}
	for i := range benchServices {
		ns := "bench"
		sa := fmt.Sprintf("svc-%d", i)
		s := &mesh.Service{Namespace: ns, Name: sa, Hostname: fmt.Sprintf("%s.%s.svc.cluster.local", sa, ns),
			Ports: []mesh.Port{{Name: "http", Port: 8080, Protocol: mesh.HTTP}}}
		n := 2
		if i == 0 {
			n += extra
		}
		for j := range n {
			s.Endpoints = append(s.Endpoints, mesh.Endpoint{Address: fmt.Sprintf("10.%d.%d.%d", i/250, i%250, j+1), Workload: &mesh.Workload{
				Namespace: ns, Name: fmt.Sprintf("%s-%d", sa, j), ServiceAccount: sa,
				ID: spiffeid.RequireFromSegments(td, "ns", ns, "sa", sa), Labels: map[string]string{"app": sa},
			}})
		}
		m.Services = append(m.Services, s)
	}
	return m
}

// writeHeap writes a heap profile to prefix+suffix, unless prefix is
// empty.
func writeHeap(b *testing.B, prefix, suffix string) {
	if prefix == "" {
		return
	}
	// The profile is as of the last collection.
	runtime.GC()
	f, err := os.Create(prefix + suffix)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := pprof.Lookup("allocs").WriteTo(f, 0); err != nil {
		b.Fatal(err)
	}
}

func rssMB(field string) float64 {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0
	}
	for _, line := range strings.Split(string(b), "\n") {
		if strings.HasPrefix(line, field+":") {
			f := strings.Fields(line)
			kb, _ := strconv.ParseFloat(f[1], 64)
			return kb / 1024
		}
	}
	return 0
}

// BenchmarkPushConvergence measures the time from a mesh change (one new
// endpoint: the endpoints of every sidecar change) until every simulated
// Envoy ADS client over loopback has received and acknowledged it, and
// the server process's resident memory.
func BenchmarkPushConvergence(b *testing.B) {
	for _, delta := range []bool{false, true} {
		for _, n := range benchClientCounts() {
			mode := map[bool]string{false: "sotw", true: "delta"}[delta]
			b.Run(fmt.Sprintf("%s/clients=%d", mode, n), func(b *testing.B) { benchConvergence(b, n, delta) })
		}
	}
}

func benchConvergence(b *testing.B, n int, delta bool) {
	e := start(b, benchMesh(0, n), nil)
	certs := filepath.Join(e.dir, "client")
	e.mint(spiffeid.RequireFromString("spiffe://cluster.local/ns/bench/sa/client")).writeDir(b, certs)
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), benchEnvClients+"="+strconv.Itoa(n), benchEnvAddr+"="+e.addr, benchEnvCerts+"="+certs,
		benchEnvDelta+"="+strconv.FormatBool(delta))
	cmd.Stderr = os.Stderr
	stdin, err := cmd.StdinPipe()
	if err != nil {
		b.Fatal(err)
	}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		b.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { stdin.Close(); _ = cmd.Wait() })
	lines := bufio.NewScanner(stdout)
	expect := func(want string) {
		b.Helper()
		if !lines.Scan() || lines.Text() != want {
			b.Fatalf("client process said %q (%v), want %q", lines.Text(), lines.Err(), want)
		}
	}
	connectStart := time.Now()
	expect("ready")
	b.Logf("%d clients connected and configured in %s", n, time.Since(connectStart).Round(time.Millisecond))
	b.ResetTimer()
	var total time.Duration
	// TRUSTMESH_XDS_BENCH_CPU=file profiles the pushes only, not the
	// connect.
	if p := os.Getenv("TRUSTMESH_XDS_BENCH_CPU"); p != "" {
		if f, err := os.Create(p); err == nil {
			if err := pprof.StartCPUProfile(f); err == nil {
				defer func() {
					pprof.StopCPUProfile()
					f.Close()
				}()
			} else {
				f.Close()
			}
		}
	}
	// TRUSTMESH_XDS_BENCH_ALLOCS=file writes heap profiles to file.before
	// and file.after the pushes; `go tool pprof -sample_index=alloc_space
	// -base file.before file.after` is what the pushes allocated.
	allocs := os.Getenv("TRUSTMESH_XDS_BENCH_ALLOCS")
	writeHeap(b, allocs, ".before")
	for i := range b.N {
		b.StopTimer()
		if _, err := io.WriteString(stdin, "go\n"); err != nil {
			b.Fatal(err)
		}
		expect("armed")
		b.StartTimer()
		t0 := time.Now()
		e.push(benchMesh(i+1, n), nil)
		expect("converged")
		total += time.Since(t0)
	}
	b.StopTimer()
	writeHeap(b, allocs, ".after")
	b.ReportMetric(total.Seconds()/float64(b.N), "s/convergence")
	b.ReportMetric(rssMB("VmRSS"), "MB-RSS")
	b.ReportMetric(rssMB("VmHWM"), "MB-peak-RSS")
	// What the server holds live, with the clients still connected. Two
	// collections: sync.Pool's victim cache (grpc-go's pooled send
	// buffers) survives the first.
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	b.ReportMetric(float64(ms.HeapAlloc)/(1<<20), "MB-live-heap")
	if p := os.Getenv("TRUSTMESH_XDS_BENCH_HEAP"); p != "" {
		f, err := os.Create(p)
		if err == nil {
			_ = pprof.WriteHeapProfile(f)
			f.Close()
		}
	}
}

// runBenchClients is the child process: n simulated Envoys, each on its own
// ADS stream (streamsPerConn to a connection), subscribing to clusters,
// endpoints, listeners and routes and acknowledging every response. It
// says "ready" once every client has its first endpoints, then for each
// "go" on stdin says "armed" and, once every client has acknowledged new
// endpoints, "converged".
func runBenchClients() int {
	n, _ := strconv.Atoi(os.Getenv(benchEnvClients))
	delta := os.Getenv(benchEnvDelta) == "true"
	dir := os.Getenv(benchEnvCerts)
	cert, err := tls.LoadX509KeyPair(filepath.Join(dir, "cert-chain.pem"), filepath.Join(dir, "key.pem"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	rootPEM, err := os.ReadFile(filepath.Join(dir, "root-cert.pem"))
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	roots := x509.NewCertPool()
	roots.AppendCertsFromPEM(rootPEM)
	creds := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: roots, ServerName: "127.0.0.1", MinVersion: tls.VersionTLS12})
	var conns []*grpc.ClientConn
	for range (n + streamsPerConn - 1) / streamsPerConn {
		c, err := grpc.NewClient(os.Getenv(benchEnvAddr), grpc.WithTransportCredentials(creds),
			// Envoy's HTTP/2 defaults for its xDS connection: 256 MiB
			// windows, so the server is not held to grpc-go's 64 KiB.
			grpc.WithInitialWindowSize(envoyWindow), grpc.WithInitialConnWindowSize(envoyWindow))
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 1
		}
		conns = append(conns, c)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		ready     sync.WaitGroup
		epoch     atomic.Int64 // bumped by "go"
		converged atomic.Int64
		failed    atomic.Int64
		// reconnects counts streams opened again after the server
		// reset them.
		reconnects atomic.Int64
		done       = make(chan struct{}, 1)
	)
	onEDS := func(seen *int64) {
		if e := epoch.Load(); e > 0 && *seen < e {
			*seen = e
			if converged.Add(1) == int64(n) {
				done <- struct{}{}
			}
		}
	}
	ready.Add(n)
	for i := range n {
		md, _ := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": "client", "NAMESPACE": "bench"})
		node := &corev3.Node{Id: fmt.Sprintf("sidecar~10.200.%d.%d~client-%d.bench~bench.svc.cluster.local", i/250, i%250, i), Metadata: md}
		client := discoveryv3.NewAggregatedDiscoveryServiceClient(conns[i/streamsPerConn])
		go func() {
			var (
				err       error
				seen      int64
				once      sync.Once
				readyDone = func() { once.Do(ready.Done) }
			)
			// A stream the server resets (a client process starved of
			// CPU for longer than the server's TCP user timeout) opens
			// again, as an Envoy does; a few times at most.
			for attempt := 0; attempt < 10 && ctx.Err() == nil; attempt++ {
				if delta {
					err = deltaClient(ctx, client, node, readyDone, &seen, onEDS)
				} else {
					err = sotwClient(ctx, client, node, readyDone, &seen, onEDS)
				}
				if status.Code(err) != codes.Unavailable {
					break
				}
				reconnects.Add(1)
				time.Sleep(100 * time.Millisecond)
			}
			readyDone()
			if ctx.Err() == nil {
				fmt.Fprintln(os.Stderr, "client:", err)
				failed.Add(1)
				select {
				case done <- struct{}{}:
				default:
				}
			}
		}()
	}
	ready.Wait()
	if failed.Load() > 0 {
		fmt.Println("failed")
		return 1
	}
	fmt.Fprintf(os.Stderr, "streams opened again after a reset while connecting: %d\n", reconnects.Load())
	fmt.Println("ready")
	in := bufio.NewScanner(os.Stdin)
	for in.Scan() {
		converged.Store(0)
		epoch.Add(1)
		fmt.Println("armed")
		<-done
		if failed.Load() > 0 {
			fmt.Println("failed")
			return 1
		}
		fmt.Println("converged")
	}
	cancel()
	for _, c := range conns {
		c.Close()
	}
	return 0
}

var benchTypes = []string{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType}

func sotwClient(ctx context.Context, c discoveryv3.AggregatedDiscoveryServiceClient, node *corev3.Node, readyDone func(), seen *int64, onEDS func(*int64)) (err error) {
	s, err := c.StreamAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	for _, typ := range benchTypes {
		req := &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typ}
		if typ == resource.RouteType {
			req.ResourceNames = []string{"8080"}
		}
		if err := s.Send(req); err != nil {
			return err
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		req := &discoveryv3.DiscoveryRequest{TypeUrl: resp.GetTypeUrl(), VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}
		if resp.GetTypeUrl() == resource.RouteType {
			req.ResourceNames = []string{"8080"}
		}
		if err := s.Send(req); err != nil {
			return err
		}
		if resp.GetTypeUrl() == resource.EndpointType {
			readyDone()
			onEDS(seen)
		}
	}
}

func deltaClient(ctx context.Context, c discoveryv3.AggregatedDiscoveryServiceClient, node *corev3.Node, readyDone func(), seen *int64, onEDS func(*int64)) (err error) {
	s, err := c.DeltaAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	for _, typ := range benchTypes {
		req := &discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typ}
		if typ == resource.RouteType {
			req.ResourceNamesSubscribe = []string{"8080"}
		}
		if err := s.Send(req); err != nil {
			return err
		}
	}
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
			return err
		}
		if resp.GetTypeUrl() == resource.EndpointType {
			readyDone()
			onEDS(seen)
		}
	}
}

// benchClientCounts are the client counts BenchmarkPushConvergence runs:
// 1,000 and 10,000, or TRUSTMESH_XDS_BENCH_COUNTS (comma-separated).
func benchClientCounts() []int {
	v := os.Getenv("TRUSTMESH_XDS_BENCH_COUNTS")
	if v == "" {
		return []int{1000, 10000}
	}
	var out []int
	for _, f := range strings.Split(v, ",") {
		if n, err := strconv.Atoi(strings.TrimSpace(f)); err == nil && n > 0 {
			out = append(out, n)
		}
	}
	return out
}

// envoyWindow is Envoy's default HTTP/2 initial stream and connection
// window (initial_stream_window_size, initial_connection_window_size),
// which a simulated Envoy advertises as a real one does.
const envoyWindow = 256 << 20

// benchInitialPushes is TRUSTMESH_XDS_BENCH_INITIAL_PUSHES: how many nodes
// the benchmarked server sends a new version at once (zero, the default:
// DefaultInitialPushes).
func benchInitialPushes() int {
	k, _ := strconv.Atoi(os.Getenv("TRUSTMESH_XDS_BENCH_INITIAL_PUSHES"))
	return k
}
