// Command xds-load drives a running `trustmesh serve` over xDS as a fleet of
// simulated Envoy sidecars, from a process of its own, so that the
// server's resident memory is the server's alone (bench/xds.sh), and
// checks them against a sample of real grpc-go xDS clients.
//
// With -gen it writes a mesh directory for serve's --mesh: -services HTTP
// services of two endpoints each, -clients pods that serve nothing and
// -grpc-clients pods for the proxyless sample, all of namespace bench and
// service account client, and exits.
//
// Otherwise it enrols once with a join token (-token, from `trustmesh ca
// token create`) over the CA's wire API, and every client presents that
// one certificate: the pods of a service account share a SPIFFE ID, which
// is all the xDS server authenticates and caps, and the server's work per
// handshake (the chain verified against the bundle) is the same whichever
// key the certificate holds. Each simulated client is an ADS stream (state
// of the world, or delta with -delta) subscribing to clusters, endpoints
// and listeners (wildcard) and to route 8080, and acknowledging every
// response; -per-conn clients share a connection (1: one connection, one
// TLS handshake, per Envoy, as in a mesh; real Envoys each have their own,
// so -per-conn above 1 only spares this tool handshakes and memory). A
// stream waits for its connection to be ready (grpc-go's backoff), and a
// stream cut with its connection is opened again, as an Envoy retries its
// xDS connection, as is one the server refused with ResourceExhausted,
// after Envoy's retry backoff; the reopened streams are counted in the
// result.
//
// The cold connect is two phases, reported apart: every connection's mTLS
// handshake (at most -dial-concurrency in flight, as a mesh's proxies do
// not all start in the same millisecond), with serve's CPU per handshake
// from /proc; then every client's first configuration, until each holds
// svc-0's endpoints. Then -grpc-clients proxyless grpc-go clients
// (grpcsample.go) resolve svc-0 and must see the same endpoints. Then
// -rounds times it rewrites the mesh with one more endpoint on svc-0: a
// client has converged when the svc-0 endpoints it received are exactly
// the new set; the round reports when the last did (the server's debounce
// included) and the p50 and p99 over clients, then the time until every
// proxyless client balances over that same set, and FAILS if one does not
// within -grpc-timeout. serve's RSS (/proc/<-server-pid>/status) is read
// at the end. One JSON line.
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
	"io"
	mrand "math/rand/v2"
	"os"
	"runtime/pprof"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
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

	// The cold connect, phase 1: every connection's mTLS handshake.
	Connections     int     `json:"connections"`
	DialConcurrency int     `json:"dial_concurrency"`
	HandshakesS     float64 `json:"handshakes_s"`
	HandshakesPerS  float64 `json:"handshakes_per_s"`
	// CPU per handshake, serve's and this tool's (both sides' TLS), in ms.
	ServerCPUPerHandshakeMS float64 `json:"server_cpu_ms_per_handshake,omitempty"`
	ToolCPUPerHandshakeMS   float64 `json:"tool_cpu_ms_per_handshake"`
	// Phase 2: every client's first configuration, over the open connections.
	FirstConfigS          float64 `json:"first_config_s"`
	ServerCPUFirstConfigS float64 `json:"server_cpu_first_config_s,omitempty"`
	ToolCPUFirstConfigS   float64 `json:"tool_cpu_first_config_s"`
	FirstConfigP50S       float64 `json:"first_config_p50_s"`
	FirstConfigP99S       float64 `json:"first_config_p99_s"`
	FirstConfigP999S      float64 `json:"first_config_p999_s"`
	// Each change round: per-client convergence percentiles, serve's and
	// this tool's CPU.
	ConvergeP50S    []float64 `json:"convergence_p50_s"`
	ConvergeP99S    []float64 `json:"convergence_p99_s"`
	ConvergeP999S   []float64 `json:"convergence_p999_s"`
	ServerCPUPushS  []float64 `json:"server_cpu_push_s,omitempty"`
	ToolCPUPushS    []float64 `json:"tool_cpu_push_s"`
	ServerRSSPushMB []float64 `json:"server_rss_after_push_mb,omitempty"`
	// With -hold: how long the fleet stayed connected and idle after the
	// rounds, and serve's RSS every holdSample meanwhile (server_rss_mb is
	// then read at its end).
	HoldS           float64   `json:"hold_s,omitempty"`
	ServerRSSHeldMB []float64 `json:"server_rss_held_mb,omitempty"`
	// serve's RSS before the first handshake: what it holds with no client.
	ServerRSSBaseMB float64 `json:"server_rss_base_mb,omitempty"`
	// The proxyless grpc-go sample: its first endpoints after it starts,
	// and each round's time until the last of them balances over the set
	// the simulated clients received (from the same mesh write).
	GRPCClients   int       `json:"grpc_clients"`
	GRPCConnectS  float64   `json:"grpc_connect_s,omitempty"`
	GRPCConvergeS []float64 `json:"grpc_convergence_s,omitempty"`
	GRPCAgreed    bool      `json:"grpc_agreed"`
	// Streams the server's side cut (Unavailable, or Canceled before a
	// response), ended (EOF) or refused (ResourceExhausted) and the client
	// opened again, and the last such error; a client cut more than
	// maxReopens times fails the run.
	StreamsReopened int64  `json:"streams_reopened"`
	LastReopen      string `json:"last_reopen_error,omitempty"`
	// This tool's own peak RSS, to size the machine for a large run.
	ToolPeakRSSMB float64 `json:"tool_peak_rss_mb"`
	WallS         float64 `json:"wall_s"`
}

type options struct {
	meshDir, addr, caFile, token       string
	services, clients, perConn, rounds int
	grpcClients, dialConcurrency       int
	delta                              bool
	serverPID                          int
	roundTimeout, grpcTimeout, hold    time.Duration
	// retryBackoff is how long a refused stream waits before it is opened
	// again, by the refusals in a row before it (envoyRetryBackoff).
	retryBackoff func(refusals int) time.Duration
	// dialOptions are added to every simulated client's connection (tests).
	dialOptions []grpc.DialOption
}

func main() {
	var o options
	gen := flag.Bool("gen", false, "write the mesh directory -mesh and exit")
	flag.StringVar(&o.meshDir, "mesh", "", "the mesh directory serve reads (required)")
	flag.IntVar(&o.services, "services", 1000, "HTTP services in the mesh")
	flag.IntVar(&o.clients, "clients", 1000, "simulated Envoy sidecars")
	flag.IntVar(&o.grpcClients, "grpc-clients", 8, "proxyless grpc-go xDS clients checked against the simulated ones (the same with -gen)")
	flag.StringVar(&o.addr, "addr", "127.0.0.1:15012", "serve's --listen-ca address")
	flag.StringVar(&o.caFile, "ca-file", "", "the trust bundle (trustmesh ca bundle), PEM")
	flag.StringVar(&o.token, "token", "", "a join token for spiffe://TD/ns/bench/sa/client")
	flag.IntVar(&o.perConn, "per-conn", 1, "clients per connection")
	flag.IntVar(&o.dialConcurrency, "dial-concurrency", 256, "mTLS handshakes in flight at once during the cold connect")
	flag.BoolVar(&o.delta, "delta", false, "delta ADS instead of state of the world")
	flag.IntVar(&o.rounds, "rounds", 3, "configuration changes to time")
	flag.DurationVar(&o.hold, "hold", 0, "after the rounds, keep every client connected and idle this long, reading serve's RSS every 10 s")
	flag.IntVar(&o.serverPID, "server-pid", 0, "serve's process id, for its RSS and CPU")
	flag.DurationVar(&o.roundTimeout, "round-timeout", 5*time.Minute, "how long a phase or round may take before the run fails")
	flag.DurationVar(&o.grpcTimeout, "grpc-timeout", time.Minute, "how long the proxyless clients may lag the simulated ones before the round fails")
	cpuProfile := flag.String("cpuprofile", "", "write this tool's CPU profile to the file")
	serveNoopAddr := flag.String("serve-noop", "", "serve the no-op floor (noop.go) on this address for the mesh -mesh, writing its root to -ca-out, until killed")
	caOut := flag.String("ca-out", "", "with -serve-noop: where the floor writes its root, PEM, once it listens")
	flag.Parse()
	if *serveNoopAddr != "" {
		if o.meshDir == "" || *caOut == "" {
			fmt.Fprintln(os.Stderr, "xds-load: -serve-noop needs -mesh and -ca-out")
			os.Exit(2)
		}
		if err := serveNoop(*serveNoopAddr, o.meshDir, *caOut); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if o.meshDir == "" || o.services <= 0 || o.clients <= 0 || o.perConn <= 0 || o.grpcClients < 0 || o.dialConcurrency <= 0 {
		fmt.Fprintln(os.Stderr, "xds-load: -mesh is required; -services, -clients, -per-conn and -dial-concurrency must be positive, -grpc-clients not negative")
		os.Exit(2)
	}
	if *gen {
		if err := writeMesh(o.meshDir, o.services, o.clients, o.grpcClients, 0); err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(1)
		}
		return
	}
	if *cpuProfile != "" {
		f, err := os.Create(*cpuProfile)
		if err == nil {
			err = pprof.StartCPUProfile(f)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "xds-load:", err)
			os.Exit(1)
		}
		defer pprof.StopCPUProfile()
	}
	r, err := run(o)
	if err != nil {
		pprof.StopCPUProfile()
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	_ = json.NewEncoder(os.Stdout).Encode(r)
}

// enrol obtains a certificate for the token's SPIFFE ID over the CA's
// wire API.
func enrol(addr string, roots *x509.CertPool, token string) (tls.Certificate, error) {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{RootCAs: roots, ServerName: "localhost"})))
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("xds-load: %w", err)
	}
	defer conn.Close()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("xds-load: %w", err)
	}
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, key)
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("xds-load: %w", err)
	}
	ctx, cancel := context.WithTimeout(metadata.AppendToOutgoingContext(context.Background(), "authorization", "Bearer "+token), 30*time.Second)
	defer cancel()
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx, &pb.IstioCertificateRequest{
		Csr: string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der})), ValidityDuration: 3600,
	})
	if err != nil {
		return tls.Certificate{}, fmt.Errorf("xds-load: enrolling: %w", err)
	}
	if len(resp.GetCertChain()) < 2 {
		return tls.Certificate{}, errors.New("xds-load: enrolling: the chain has no root")
	}
	cert := tls.Certificate{PrivateKey: key}
	// The last entry is the root.
	for _, p := range resp.GetCertChain()[:len(resp.GetCertChain())-1] {
		blk, _ := pem.Decode([]byte(p))
		if blk == nil {
			return tls.Certificate{}, errors.New("xds-load: enrolling: a chain entry is not PEM")
		}
		cert.Certificate = append(cert.Certificate, blk.Bytes)
	}
	return cert, nil
}

func run(o options) (*result, error) {
	wall := time.Now()
	if o.retryBackoff == nil {
		o.retryBackoff = envoyRetryBackoff
	}
	rootPEM, err := os.ReadFile(o.caFile)
	if err != nil {
		return nil, fmt.Errorf("xds-load: %w", err)
	}
	roots := x509.NewCertPool()
	if !roots.AppendCertsFromPEM(rootPEM) {
		return nil, fmt.Errorf("xds-load: %s holds no certificate", o.caFile)
	}
	cert, err := enrol(o.addr, roots, o.token)
	if err != nil {
		return nil, err
	}
	n := o.clients
	creds := credentials.NewTLS(&tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: roots, ServerName: "localhost", MinVersion: tls.VersionTLS12})
	var conns []*grpc.ClientConn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range (n + o.perConn - 1) / o.perConn {
		c, err := grpc.NewClient(o.addr, append([]grpc.DialOption{grpc.WithTransportCredentials(creds),
			// Envoy's HTTP/2 defaults for its xDS connection: 256 MiB
			// windows, so the server is not held to grpc-go's 64 KiB.
			grpc.WithInitialWindowSize(envoyWindow), grpc.WithInitialConnWindowSize(envoyWindow),
			// This tool's own memory: a small read buffer (frames larger
			// than it are read straight into their own) and write buffers
			// shared between connections, so that N connections in one
			// process do not hold 64 KiB each.
			grpc.WithReadBufferSize(toolReadBuffer), grpc.WithSharedWriteBuffer(true)}, o.dialOptions...)...)
		if err != nil {
			return nil, fmt.Errorf("xds-load: %w", err)
		}
		conns = append(conns, c)
	}
	r := &result{Tool: "xds-load", Mode: map[bool]string{false: "sotw", true: "delta"}[o.delta], Services: o.services, Clients: n,
		PerConn: o.perConn, Connections: len(conns), DialConcurrency: o.dialConcurrency, GRPCClients: o.grpcClients}
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	// Phase 1: the handshakes.
	if o.serverPID > 0 {
		r.ServerRSSBaseMB = procMB(o.serverPID, "VmRSS")
	}
	srv0, self0 := cpuSeconds(o.serverPID), cpuSeconds(os.Getpid())
	t0 := time.Now()
	if err := handshakes(ctx, conns, o.dialConcurrency, o.roundTimeout); err != nil {
		return nil, err
	}
	r.HandshakesS = time.Since(t0).Seconds()
	r.HandshakesPerS = float64(len(conns)) / r.HandshakesS
	srv1, self1 := cpuSeconds(o.serverPID), cpuSeconds(os.Getpid())
	if o.serverPID > 0 {
		r.ServerCPUPerHandshakeMS = (srv1 - srv0) * 1000 / float64(len(conns))
	}
	r.ToolCPUPerHandshakeMS = (self1 - self0) * 1000 / float64(len(conns))

	// Phase 2: every client's first configuration.
	f := &fleet{last: make([]atomic.Pointer[string], n)}
	var (
		reopened   atomic.Int64
		lastReopen atomic.Value
		failed     atomic.Int64
		firstErr   atomic.Value
		failure    = make(chan struct{})
		once       sync.Once
	)
	cold := newRound(0, n, svc0Want(0))
	f.cur.Store(cold)
	for i := range n {
		md, _ := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": "client", "NAMESPACE": meshNS})
		node := &corev3.Node{Id: fmt.Sprintf("sidecar~10.200.%d.%d~client-%d.%s~%s.svc.cluster.local", i/250, i%250, i, meshNS, meshNS), Metadata: md}
		client := discoveryv3.NewAggregatedDiscoveryServiceClient(conns[i/o.perConn])
		go func() {
			seen := -1
			// answered: the stream now open has had a response.
			answered := false
			observe := func(set string) { answered = true; f.observe(i, &seen, set) }
			var err error
			// A stream cut with its connection (Unavailable) or ended by
			// the server (io.EOF: the handler returned, which
			// go-control-plane does when its receive fails) is opened
			// again, as an Envoy re-subscribes; each is counted. A
			// stream the server refused or cut before any response is
			// opened again after Envoy's xDS retry backoff, which grows
			// with the refusals in a row; also counted. serve's port
			// does both at a cold connect of thousands on 2 cores: it
			// refuses a new stream (ResourceExhausted) while too many
			// are still waiting for their first request, and cuts one
			// whose first request is slow to arrive, to make room or
			// after its time-out (Canceled: go-control-plane's handler
			// returns as the stream's context ends). A client reopened
			// more than maxReopens times in the run fails it.
			refusals := 0
		reopen:
			for again := 0; again <= maxReopens; again++ {
				answered = false
				if o.delta {
					err = deltaClient(ctx, client, node, observe)
				} else {
					err = sotwClient(ctx, client, node, observe)
				}
				if ctx.Err() != nil {
					break
				}
				switch code := status.Code(err); {
				case errors.Is(err, io.EOF), code == codes.Unavailable:
					refusals = 0
				case (code == codes.ResourceExhausted || code == codes.Canceled) && !answered:
					if again == maxReopens {
						break reopen
					}
					select {
					case <-time.After(o.retryBackoff(refusals)):
					case <-ctx.Done():
						break reopen
					}
					refusals++
				default:
					break reopen
				}
				reopened.Add(1)
				lastReopen.Store(fmt.Sprintf("client-%d: %v", i, err))
			}
			if ctx.Err() == nil {
				firstErr.CompareAndSwap(nil, fmt.Sprintf("client-%d: %v", i, err))
				failed.Add(1)
				once.Do(func() { close(failure) })
			}
		}()
	}
	wait := func(rd *round) error {
		select {
		case <-rd.done:
			return nil
		case <-failure:
			return fmt.Errorf("xds-load: %d clients failed, the first: %v", failed.Load(), firstErr.Load())
		case <-time.After(o.roundTimeout):
			return fmt.Errorf("xds-load: round %d: %d of %d clients hold svc-0's endpoints [%s] after %s; the others last received (set: clients): %v",
				rd.n, n-int(rd.left.Load()), n, rd.want, o.roundTimeout, f.disagreeing(rd))
		}
	}
	if err := wait(cold); err != nil {
		return nil, err
	}
	r.FirstConfigS, r.FirstConfigP50S, r.FirstConfigP99S, r.FirstConfigP999S = cold.stats()
	srv2, self2 := cpuSeconds(o.serverPID), cpuSeconds(os.Getpid())
	if o.serverPID > 0 {
		r.ServerCPUFirstConfigS = srv2 - srv1
	}
	r.ToolCPUFirstConfigS = self2 - self1
	r.ConnectS = r.HandshakesS + r.FirstConfigS

	// The proxyless sample joins the connected fleet.
	var smp *sample
	if o.grpcClients > 0 {
		t := time.Now()
		if smp, err = startSample(o.grpcClients, o.addr, cert, rootPEM); err != nil {
			return nil, err
		}
		defer smp.close()
		last, err := smp.wait(cold.want, o.grpcTimeout)
		if err != nil {
			return nil, err
		}
		r.GRPCConnectS = last.Sub(t).Seconds()
	}

	for round := 1; round <= o.rounds; round++ {
		srv, self := cpuSeconds(o.serverPID), cpuSeconds(os.Getpid())
		rd := newRound(round, n, svc0Want(round))
		f.cur.Store(rd)
		if err := writeMesh(o.meshDir, o.services, n, o.grpcClients, round); err != nil {
			return nil, err
		}
		if err := wait(rd); err != nil {
			return nil, err
		}
		all, p50, p99, p999 := rd.stats()
		r.ConvergeP999S = append(r.ConvergeP999S, p999)
		r.ToolCPUPushS = append(r.ToolCPUPushS, cpuSeconds(os.Getpid())-self)
		r.ConvergeS, r.ConvergeP50S, r.ConvergeP99S = append(r.ConvergeS, all), append(r.ConvergeP50S, p50), append(r.ConvergeP99S, p99)
		if smp != nil {
			last, err := smp.wait(rd.want, o.grpcTimeout)
			if err != nil {
				return nil, fmt.Errorf("%w (round %d: every simulated client holds that set)", err, round)
			}
			r.GRPCConvergeS = append(r.GRPCConvergeS, last.Sub(rd.start).Seconds())
		}
		if o.serverPID > 0 {
			r.ServerCPUPushS = append(r.ServerCPUPushS, cpuSeconds(o.serverPID)-srv)
			r.ServerRSSPushMB = append(r.ServerRSSPushMB, procMB(o.serverPID, "VmRSS"))
		}
	}
	r.GRPCAgreed = smp != nil
	if o.serverPID > 0 && o.hold > 0 {
		r.HoldS = o.hold.Seconds()
		for end := time.Now().Add(o.hold); time.Now().Before(end); {
			time.Sleep(min(holdSample, time.Until(end)))
			r.ServerRSSHeldMB = append(r.ServerRSSHeldMB, procMB(o.serverPID, "VmRSS"))
		}
		// Every client must still be connected: a fleet that fell away
		// would make the held RSS small for the wrong reason.
		select {
		case <-failure:
			return nil, fmt.Errorf("xds-load: during the hold %d clients failed, the first: %v", failed.Load(), firstErr.Load())
		default:
		}
	}
	if o.serverPID > 0 {
		r.RSSMB, r.PeakRSSMB = procMB(o.serverPID, "VmRSS"), procMB(o.serverPID, "VmHWM")
		r.KBPerClient = r.RSSMB * 1024 / float64(n)
	}
	r.StreamsReopened = reopened.Load()
	if v, ok := lastReopen.Load().(string); ok {
		r.LastReopen = v
	}
	r.ToolPeakRSSMB = procMB(os.Getpid(), "VmHWM")
	r.WallS = time.Since(wall).Seconds()
	return r, nil
}

// toolReadBuffer is the read buffer of each simulated Envoy's connection.
const toolReadBuffer = 4 << 10

// holdSample is how often -hold reads serve's RSS.
const holdSample = 10 * time.Second

// maxReopens is how many times one simulated client may have its stream
// cut before the run fails.
const maxReopens = 3

// envoyRetryBackoff is how long an Envoy waits before it opens its xDS
// stream again after the attempt-th failure in a row (counted from 0):
// jittered exponential backoff, uniform below 500 ms doubled per
// attempt, at most 30 s (Envoy's GrpcStream: RetryInitialDelayMs,
// RetryMaxDelayMs).
func envoyRetryBackoff(attempt int) time.Duration {
	ceiling := min(500*time.Millisecond<<min(attempt, 6), 30*time.Second)
	return time.Duration(mrand.Int64N(int64(ceiling))) + time.Millisecond
}

// handshakes connects every connection, at most conc at once, and waits
// until each is READY (TLS handshake and HTTP/2 prefaces done).
func handshakes(ctx context.Context, conns []*grpc.ClientConn, conc int, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	sem := make(chan struct{}, conc)
	var wg sync.WaitGroup
	var notReady atomic.Int64
	for _, c := range conns {
		sem <- struct{}{}
		wg.Add(1)
		go func() {
			defer func() { <-sem; wg.Done() }()
			c.Connect()
			for s := c.GetState(); s != connectivity.Ready; s = c.GetState() {
				if !c.WaitForStateChange(ctx, s) {
					notReady.Add(1)
					return
				}
			}
		}()
	}
	wg.Wait()
	if k := notReady.Load(); k > 0 {
		return fmt.Errorf("xds-load: %d of %d connections not READY after %s", k, len(conns), timeout)
	}
	return nil
}

// stats is when the last client reached the round, and the p50, p99 and
// p99.9 over clients, in seconds after the round started.
func (r *round) stats() (last, p50, p99, p999 float64) {
	d := make([]float64, len(r.at))
	for i := range r.at {
		d[i] = time.Duration(r.at[i].Load()).Seconds()
	}
	slices.Sort(d)
	q := func(p float64) float64 { return d[min(len(d)-1, int(p*float64(len(d))))] }
	return d[len(d)-1], q(0.50), q(0.99), q(0.999)
}

// cpuSeconds is a process's user and system CPU time from /proc, or 0.
func cpuSeconds(pid int) float64 {
	if pid <= 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the command name, which is in parentheses: state is
	// field 3, utime 14 and stime 15.
	i := strings.LastIndexByte(string(b), ')')
	if i < 0 {
		return 0
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 13 {
		return 0
	}
	ut, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	// USER_HZ is 100 on Linux.
	return (ut + st) / 100
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

// envoyWindow is Envoy's default HTTP/2 initial stream and connection
// window (initial_stream_window_size, initial_connection_window_size),
// which a simulated Envoy advertises as a real one does.
const envoyWindow = 256 << 20
