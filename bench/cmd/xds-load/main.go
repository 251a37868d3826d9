// Command xds-load drives a running `trustmesh serve` over xDS as a fleet of
// simulated Envoy sidecars, from a process of its own, so that the
// server's resident memory is the server's alone (bench/xds.sh).
//
// With -gen it writes a mesh directory for serve's --mesh: -services HTTP
// services of two endpoints each, and -clients pods that serve nothing,
// all of namespace bench and service account client, and exits.
//
// Otherwise it enrols once with a join token (-token, from `trustmesh ca
// token create`) over the CA's wire API, and every simulated client
// presents that one certificate: the pods of a service account share a
// SPIFFE ID, which is all the xDS server authenticates and caps, and the
// server's work per handshake (the chain verified against the bundle) is
// the same whichever key the certificate holds. Each client is an ADS
// stream (state of the world, or delta with -delta) subscribing to
// clusters, endpoints and listeners (wildcard) and to route 8080, and
// acknowledging every response; -per-conn clients share a connection
// (1: one connection, one TLS handshake, per Envoy, as in a mesh). A
// stream whose connection fails waits for it to reconnect (grpc-go's
// backoff), as an Envoy retries its xDS connection; serve resets a
// handshake that does not finish in its handshake timeout, which a burst
// of thousands of handshakes on two cores can exceed.
//
// It reports the cold connect (every client has its first endpoints),
// then -rounds times rewrites the mesh with one more endpoint on svc-0 and
// reports the time until every client has received and acknowledged new
// endpoints (the server's debounce included), with the server's RSS from
// /proc/<-server-pid>/status. One JSON line.
package main

import (
	"bufio"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
)

type result struct {
	Tool        string    `json:"tool"`
	Mode        string    `json:"mode"`
	Services    int       `json:"services"`
	Clients     int       `json:"clients"`
	PerConn     int       `json:"clients_per_connection"`
	ConnectS    float64   `json:"cold_connect_s"`
	ConvergeS   []float64 `json:"convergence_s"`
	RSSMB       float64   `json:"server_rss_mb,omitempty"`
	PeakRSSMB   float64   `json:"server_peak_rss_mb,omitempty"`
	KBPerClient float64   `json:"server_rss_kb_per_client,omitempty"`
}

func main() {
	gen := flag.Bool("gen", false, "write the mesh directory -mesh and exit")
	meshDir := flag.String("mesh", "", "the mesh directory serve reads (required)")
	services := flag.Int("services", 1000, "HTTP services in the mesh")
	clients := flag.Int("clients", 1000, "simulated Envoy sidecars")
	addr := flag.String("addr", "127.0.0.1:15012", "serve's --listen-ca address")
	caFile := flag.String("ca-file", "", "the trust bundle (trustmesh ca bundle), PEM")
	token := flag.String("token", "", "a join token for spiffe://TD/ns/bench/sa/client")
	perConn := flag.Int("per-conn", 1, "clients per connection")
	delta := flag.Bool("delta", false, "delta ADS instead of state of the world")
	rounds := flag.Int("rounds", 3, "configuration changes to time")
	serverPID := flag.Int("server-pid", 0, "serve's process id, for its RSS")
	flag.Parse()
	if *meshDir == "" || *services <= 0 || *clients <= 0 || *perConn <= 0 {
		fmt.Fprintln(os.Stderr, "xds-load: -mesh is required; -services, -clients and -per-conn must be positive")
		os.Exit(2)
	}
	if *gen {
		if err := writeMesh(*meshDir, *services, *clients, 0); err != nil {
			fmt.Fprintln(os.Stderr, "xds-load:", err)
			os.Exit(1)
		}
		return
	}
	r, err := run(*meshDir, *services, *clients, *addr, *caFile, *token, *perConn, *delta, *rounds, *serverPID)
	if err != nil {
		fmt.Fprintln(os.Stderr, "xds-load:", err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(r)
}

// writeMesh writes the services (svc-0 with extra more endpoints) and the
// client pods, each file replaced atomically so serve never reads half.
func writeMesh(dir string, services, clients, extra int) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	var b strings.Builder
	for i := range services {
		fmt.Fprintf(&b, "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Service\nmetadata: {name: svc-%d, namespace: bench}\nspec:\n"+
			"  ports: [{name: http, port: 8080, protocol: HTTP}]\n  endpoints:\n", i)
		n := 2
		if i == 0 {
			n += extra
		}
		for j := range n {
			fmt.Fprintf(&b, "  - {address: 10.%d.%d.%d, pod: svc-%d-%d, spiffeID: spiffe://cluster.local/ns/bench/sa/svc-%d, labels: {app: svc-%d}}\n",
				i/250, i%250, j+1, i, j, i, i)
		}
		b.WriteString("---\n")
	}
	if err := replace(filepath.Join(dir, "services.yaml"), b.String()); err != nil {
		return err
	}
	if extra > 0 {
		return nil
	}
	b.Reset()
	for i := range clients {
		fmt.Fprintf(&b, "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Workload\nmetadata: {name: client-%d, namespace: bench}\n"+
			"spec: {spiffeID: spiffe://cluster.local/ns/bench/sa/client}\n---\n", i)
	}
	return replace(filepath.Join(dir, "clients.yaml"), b.String())
}

func replace(path, content string) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}

// enrol obtains a certificate for the token's SPIFFE ID over the CA's
// wire API.
func enrol(addr string, roots *x509.CertPool, token string) (tls.Certificate, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost"})))
	if err != nil {
		return tls.Certificate{}, err
	}
	defer conn.Close()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, err
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return tls.Certificate{}, err
	}
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token), 30*time.Second)
	defer cancel()
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("enrolling: %w", err)
	}
	cert := tls.Certificate{PrivateKey: key}
	// The last entry is the root.
	for _, p := range resp.GetCertChain()[:len(resp.GetCertChain())-1] {
		blk, _ := pem.Decode([]byte(p))
		if blk == nil {
			return tls.Certificate{}, errors.New("enrolling: a chain entry is not PEM")
		}
		cert.Certificate = append(cert.Certificate, blk.Bytes)
	}
	return cert, nil
}

func run(meshDir string, services, n int, addr, caFile, token string, perConn int, delta bool, rounds, serverPID int) (*result, error) {
	rootPEM, err := os.ReadFile(caFile)
	if err != nil {
		return nil, err
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return nil, fmt.Errorf("%s holds no certificate", caFile)
	}
	cert, err := enrol(addr, roots, token)
	if err != nil {
		return nil, err
	}
	creds := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS12})
	var conns []*grpc.ClientConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range (n + perConn - 1) / perConn {
		c, err := grpc.NewClient(addr, grpc.WithTransportCredentials(creds),
			// Envoy's HTTP/2 defaults for its xDS connection: 256 MiB
			// windows, so the server is not held to grpc-go's 64 KiB.
			grpc.WithInitialWindowSize(envoyWindow), grpc.WithInitialConnWindowSize(envoyWindow))
		if err != nil {
			return nil, err
		}
		conns = append(conns, c)
	}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var (
		ready     sync.WaitGroup
		epoch     atomic.Int64
		converged atomic.Int64
		failed    atomic.Int64
		firstErr  atomic.Value
		done      = make(chan struct{}, 1)
	)
	onEDS := func(seen *int64) {
		if e := epoch.Load(); e > 0 && *seen < e {
			*seen = e
			if converged.Add(1) == int64(n) {
				done <- struct{}{}
			}
		}
	}
	r := &result{Tool: "xds-load", Mode: map[bool]string{false: "sotw", true: "delta"}[delta], Services: services, Clients: n, PerConn: perConn}
	t0 := time.Now()
	ready.Add(n)
	for i := range n {
		md, _ := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": "client", "NAMESPACE": "bench"})
		node := &corev3.Node{Id: fmt.Sprintf("sidecar~10.200.%d.%d~client-%d.bench~bench.svc.cluster.local", i/250, i%250, i), Metadata: md}
		client := discoveryv3.NewAggregatedDiscoveryServiceClient(conns[i/perConn])
		go func() {
			var err error
			if delta {
				err = deltaClient(ctx, client, node, &ready, onEDS)
			} else {
				err = sotwClient(ctx, client, node, &ready, onEDS)
			}
			if ctx.Err() == nil {
				firstErr.CompareAndSwap(nil, err.Error())
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
		return nil, fmt.Errorf("%d clients failed: %v", failed.Load(), firstErr.Load())
	}
	r.ConnectS = time.Since(t0).Seconds()
	for round := 1; round <= rounds; round++ {
		converged.Store(0)
		epoch.Add(1)
		t := time.Now()
		if err := writeMesh(meshDir, services, n, round); err != nil {
			return nil, err
		}
		select {
		case <-done:
		case <-time.After(5 * time.Minute):
			return nil, fmt.Errorf("round %d: %d of %d clients converged in 5 minutes", round, converged.Load(), n)
		}
		if failed.Load() > 0 {
			return nil, fmt.Errorf("%d clients failed: %v", failed.Load(), firstErr.Load())
		}
		r.ConvergeS = append(r.ConvergeS, time.Since(t).Seconds())
	}
	if serverPID > 0 {
		r.RSSMB, r.PeakRSSMB = procMB(serverPID, "VmRSS"), procMB(serverPID, "VmHWM")
		r.KBPerClient = r.RSSMB * 1024 / float64(n)
	}
	return r, nil
}

func procMB(pid int, field string) float64 {
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0
	}
	defer f.Close()
	s := bufio.NewScanner(f)
	for s.Scan() {
		if v, ok := strings.CutPrefix(s.Text(), field+":"); ok {
			kb, _ := strconv.ParseFloat(strings.Fields(v)[0], 64)
			return kb / 1024
		}
	}
	return 0
}

var types = []string{resource.ClusterType, resource.EndpointType, resource.ListenerType, resource.RouteType}

func sotwClient(ctx context.Context, c discoveryv3.AggregatedDiscoveryServiceClient, node *corev3.Node, ready *sync.WaitGroup, onEDS func(*int64)) error {
	first := true
	defer func() {
		if first {
			ready.Done()
		}
	}()
	s, err := c.StreamAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	for _, typ := range types {
		req := &discoveryv3.DiscoveryRequest{Node: node, TypeUrl: typ}
		if typ == resource.RouteType {
			req.ResourceNames = []string{"8080"}
		}
		if err := s.Send(req); err != nil {
			return err
		}
	}
	var seen int64
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
			if first {
				first = false
				ready.Done()
			}
			onEDS(&seen)
		}
	}
}

func deltaClient(ctx context.Context, c discoveryv3.AggregatedDiscoveryServiceClient, node *corev3.Node, ready *sync.WaitGroup, onEDS func(*int64)) error {
	first := true
	defer func() {
		if first {
			ready.Done()
		}
	}()
	s, err := c.DeltaAggregatedResources(ctx, grpc.WaitForReady(true))
	if err != nil {
		return err
	}
	for _, typ := range types {
		req := &discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typ}
		if typ == resource.RouteType {
			req.ResourceNamesSubscribe = []string{"8080"}
		}
		if err := s.Send(req); err != nil {
			return err
		}
	}
	var seen int64
	for {
		resp, err := s.Recv()
		if err != nil {
			return err
		}
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
			return err
		}
		if resp.GetTypeUrl() == resource.EndpointType {
			if first {
				first = false
				ready.Done()
			}
			onEDS(&seen)
		}
	}
}

// envoyWindow is Envoy's default HTTP/2 initial stream and connection
// window (initial_stream_window_size, initial_connection_window_size),
// which a simulated Envoy advertises as a real one does.
const envoyWindow = 256 << 20
