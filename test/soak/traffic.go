package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"net"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"

	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

const (
	namespace   = "soak"
	trustDomain = "cluster.local"
	// callTimeout bounds one gRPC call or one probe exchange. It is long:
	// a slow call on a loaded machine is not a failed one.
	callTimeout = 30 * time.Second
)

// counts is what the workloads saw; every field is guarded by mu.
type counts struct {
	mu sync.Mutex
	// gRPC calls: decided as the policy in force says (ok, denied),
	// decided against it (wrong), started within the propagation window
	// (unjudged, counted in ok or denied too), or failed otherwise.
	calls, ok, denied, wrong, unjudged, callFailed int
	// maxPropagation is the longest a pair took, after a policy rewrite,
	// to answer its first call as the new policy says.
	maxPropagation time.Duration
	// mTLS probe exchanges, each a full handshake.
	handshakes, handshakeFailed int
	// Certificates presented or served outside NotBefore <= now < NotAfter.
	expired int
	// examples of each kind of failure, the first few.
	examples []string
}

func (c *counts) example(format string, args ...any) {
	if len(c.examples) < 30 {
		c.examples = append(c.examples, time.Now().Format(time.RFC3339Nano)+" "+fmt.Sprintf(format, args...))
	}
}

func (c *counts) snapshot() counts {
	c.mu.Lock()
	defer c.mu.Unlock()
	return counts{calls: c.calls, ok: c.ok, denied: c.denied, wrong: c.wrong, unjudged: c.unjudged,
		callFailed: c.callFailed, maxPropagation: c.maxPropagation, handshakes: c.handshakes,
		handshakeFailed: c.handshakeFailed, expired: c.expired, examples: append([]string(nil), c.examples...)}
}

// policyClock is the history of policy rewrites: phase p allows pair i
// when i+p is even.
type policyClock struct {
	mu     sync.Mutex
	writes []policyWrite
}

type policyWrite struct {
	at    time.Time
	phase int
}

func allowed(pair, phase int) bool { return (pair+phase)%2 == 0 }

func (pc *policyClock) record(at time.Time, phase int) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	pc.writes = append(pc.writes, policyWrite{at, phase})
}

// inForce returns the write in force at t and whether another came
// before end.
func (pc *policyClock) inForce(t, end time.Time) (w policyWrite, changed, ok bool) {
	pc.mu.Lock()
	defer pc.mu.Unlock()
	for i := len(pc.writes) - 1; i >= 0; i-- {
		if !pc.writes[i].at.After(t) {
			w, ok = pc.writes[i], true
			break
		}
		if !pc.writes[i].at.After(end) {
			changed = true
		}
	}
	return w, changed, ok
}

// grpcPair is a proxyless echo server and its client.
type grpcPair struct {
	index          int
	server, client *agent
	port           int
	lis            net.Listener
}

func (p *grpcPair) serverName() string { return fmt.Sprintf("echo-%d", p.index) }
func (p *grpcPair) clientName() string { return fmt.Sprintf("client-%d", p.index) }
func (p *grpcPair) hostname() string {
	return fmt.Sprintf("%s.%s.svc.cluster.local", p.serverName(), namespace)
}

func workloadID(name string) string {
	return fmt.Sprintf("spiffe://%s/ns/%s/sa/%s", trustDomain, namespace, name)
}

// meshYAML describes every pair: a service per server, a workload per
// client.
func meshYAML(pairs []*grpcPair) string {
	var b strings.Builder
	for _, p := range pairs {
		s, c := p.serverName(), p.clientName()
		fmt.Fprintf(&b, `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: %s, namespace: %s}
spec:
  hostname: %s
  ports: [{name: grpc, port: 7070, protocol: GRPC}]
  endpoints:
  - {address: 127.0.0.1, pod: %s, spiffeID: %q, labels: {app: %s}, ports: {grpc: %d}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: %s, namespace: %s}
spec: {spiffeID: %q, labels: {app: %s}}
---
`, s, namespace, p.hostname(), s, workloadID(s), s, p.port, c, namespace, workloadID(c), c)
	}
	return b.String()
}

// policyYAML is phase's policies: each pair's server admits its client,
// or someone else.
func policyYAML(pairs []*grpcPair, phase int) string {
	docs := make([]string, 0, len(pairs))
	for _, p := range pairs {
		from := p.clientName()
		if !allowed(p.index, phase) {
			from = "nobody"
		}
		docs = append(docs, fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: %s-allow, namespace: %s}
spec:
  selector: {matchLabels: {app: %s}}
  action: ALLOW
  rules:
  - from: [{source: {principals: [%q]}}]
    to: [{operation: {paths: ["/grpc.health.v1.Health/*"]}}]
`, p.serverName(), namespace, p.serverName(), strings.TrimPrefix(workloadID(from), "spiffe://")))
	}
	return strings.Join(docs, "---\n")
}

// bootstrap is grpc-go's xDS bootstrap for workload name (a pod of its
// own name in the soak namespace), with its agent's cert dir.
func bootstrap(xdsAddr, name, ip, certDir string) ([]byte, error) {
	files := map[string]any{
		"certificate_file":    filepath.Join(certDir, "cert-chain.pem"),
		"private_key_file":    filepath.Join(certDir, "key.pem"),
		"ca_certificate_file": filepath.Join(certDir, "root-cert.pem"),
	}
	provider := map[string]any{"refresh_interval": "1s"}
	for k, v := range files {
		provider[k] = v
	}
	b, err := json.Marshal(map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri":      xdsAddr,
			"channel_creds":   []any{map[string]any{"type": "tls", "config": files}},
			"server_features": []any{"xds_v3"},
		}},
		"node": map[string]any{
			"id": fmt.Sprintf("sidecar~%s~%s.%s~%s.svc.cluster.local", ip, name, namespace, namespace),
			"metadata": map[string]any{
				"SERVICE_ACCOUNT": name, "NAMESPACE": namespace, "LABELS": map[string]any{"app": name}, "GENERATOR": "grpc",
			},
		},
		"certificate_providers": map[string]any{
			proxyconfig.ProxylessCertProvider: map[string]any{"plugin_name": "file_watcher", "config": provider},
		},
		"server_listener_resource_name_template": proxyconfig.ProxylessInboundPrefix + "%s",
	})
	if err != nil {
		return nil, fmt.Errorf("soak: bootstrap: %w", err)
	}
	return b, nil
}

// servePair starts the pair's grpc-go xDS server; stop ends it.
func servePair(p *grpcPair, xdsAddr string) (stop func(), err error) {
	bs, err := bootstrap(xdsAddr, p.serverName(), "127.0.0.1", p.server.certDir)
	if err != nil {
		return nil, err
	}
	creds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return nil, fmt.Errorf("soak: %w", err)
	}
	s, err := grpcxds.NewGRPCServer(grpc.Creds(creds), grpcxds.BootstrapContentsForTesting(bs))
	if err != nil {
		return nil, fmt.Errorf("soak: xDS server of %s: %w", p.serverName(), err)
	}
	healthpb.RegisterHealthServer(s, health.NewServer())
	done := make(chan struct{})
	go func() { defer close(done); _ = s.Serve(p.lis) }()
	return func() { s.Stop(); <-done }, nil
}

// callPair calls the pair's server from its client until ctx ends,
// judging each call against the policy in force when it started.
func callPair(ctx context.Context, p *grpcPair, xdsAddr string, pc *policyClock, window time.Duration, c *counts) (stop func(), err error) {
	bs, err := bootstrap(xdsAddr, p.clientName(), "127.0.0.2", p.client.certDir)
	if err != nil {
		return nil, err
	}
	r, err := grpcxds.NewXDSResolverWithConfigForTesting(bs)
	if err != nil {
		return nil, fmt.Errorf("soak: xDS resolver of %s: %w", p.clientName(), err)
	}
	creds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return nil, fmt.Errorf("soak: %w", err)
	}
	conn, err := grpc.NewClient(fmt.Sprintf("xds:///%s:7070", p.hostname()), grpc.WithTransportCredentials(creds), grpc.WithResolvers(r))
	if err != nil {
		return nil, fmt.Errorf("soak: client of %s: %w", p.hostname(), err)
	}
	client := healthpb.NewHealthClient(conn)
	done := make(chan struct{})
	go func() {
		defer close(done)
		converged := -1 // the last phase whose first right answer was timed
		for ctx.Err() == nil {
			start := time.Now()
			cctx, cancel := context.WithTimeout(ctx, callTimeout)
			_, err := client.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
			cancel()
			end := time.Now()
			if ctx.Err() != nil {
				return // the soak ended during the call
			}
			judge(p.index, start, end, status.Code(err), err, pc, window, &converged, c)
			select {
			case <-ctx.Done():
			case <-time.After(20 * time.Millisecond):
			}
		}
	}()
	return func() { <-done; conn.Close() }, nil
}

func judge(pair int, start, end time.Time, code codes.Code, err error, pc *policyClock, window time.Duration, converged *int, c *counts) {
	w, changed, known := pc.inForce(start, end)
	c.mu.Lock()
	defer c.mu.Unlock()
	c.calls++
	switch code {
	case codes.OK:
		c.ok++
	case codes.PermissionDenied:
		c.denied++
	default:
		c.callFailed++
		c.example("pair %d: call failed: %v", pair, err)
		return
	}
	if !known {
		c.unjudged++
		return
	}
	want := codes.PermissionDenied
	if allowed(pair, w.phase) {
		want = codes.OK
	}
	// Phase 0 is written before the workloads start: its first answer
	// times their start, not a switch.
	if code == want && *converged != w.phase && w.phase > 0 {
		*converged = w.phase
		if d := end.Sub(w.at); d > c.maxPropagation {
			c.maxPropagation = d
		}
	}
	if changed || start.Before(w.at.Add(window)) {
		c.unjudged++
		return
	}
	if code != want {
		c.wrong++
		c.example("pair %d: call started %s after policy phase %d was written answered %s, want %s",
			pair, start.Sub(w.at).Round(time.Millisecond), w.phase, code, want)
	}
}

// probePair is two workloads on two agents' Workload API sockets making a
// full mTLS handshake per exchange.
type probePair struct {
	server, client *agent
}

// runProbe starts the pair's server and client until ctx ends.
func runProbe(ctx context.Context, p probePair, c *counts) (stop func(), err error) {
	open := func(a *agent) (*workloadapi.X509Source, error) {
		sctx, cancel := context.WithTimeout(ctx, callTimeout)
		defer cancel()
		src, err := workloadapi.NewX509Source(sctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+a.socket)))
		if err != nil {
			return nil, fmt.Errorf("soak: X509 source on %s: %w", a.socket, err)
		}
		return src, nil
	}
	ssrc, err := open(p.server)
	if err != nil {
		return nil, err
	}
	csrc, err := open(p.client)
	if err != nil {
		ssrc.Close()
		return nil, err
	}
	serverID, clientID := spiffeid.RequireFromString(p.server.id), spiffeid.RequireFromString(p.client.id)
	scfg := checkPresented(tlsconfig.MTLSServerConfig(ssrc, ssrc, tlsconfig.AuthorizeID(clientID)), "server", ssrc, c)
	ccfg := checkPresented(tlsconfig.MTLSClientConfig(csrc, csrc, tlsconfig.AuthorizeID(serverID)), "client", csrc, c)
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		ssrc.Close()
		csrc.Close()
		return nil, fmt.Errorf("soak: %w", err)
	}
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			conn, err := lis.Accept()
			if err != nil {
				return
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				defer conn.Close()
				_ = conn.SetDeadline(time.Now().Add(callTimeout))
				tc := tls.Server(conn, scfg)
				if err := tc.Handshake(); err != nil {
					c.mu.Lock()
					c.handshakeFailed++
					c.example("probe server %s: handshake: %v", p.server.id, err)
					c.mu.Unlock()
					return
				}
				line, err := bufio.NewReader(tc).ReadString('\n')
				if err == nil {
					_, err = tc.Write([]byte(line))
				}
				if err != nil {
					c.mu.Lock()
					c.handshakeFailed++
					c.example("probe server %s: echo: %v", p.server.id, err)
					c.mu.Unlock()
				}
			}()
		}
	}()
	var stopped atomic.Bool
	clientDone := make(chan struct{})
	go func() {
		defer close(clientDone)
		for !stopped.Load() {
			err := exchange(ccfg, lis.Addr().String())
			c.mu.Lock()
			c.handshakes++
			if err != nil {
				c.handshakeFailed++
				c.example("probe client %s: %v", p.client.id, err)
			}
			c.mu.Unlock()
			time.Sleep(100 * time.Millisecond)
		}
	}()
	return func() {
		// The client finishes its exchange, so the server fails none.
		stopped.Store(true)
		<-clientDone
		lis.Close()
		wg.Wait()
		ssrc.Close()
		csrc.Close()
	}, nil
}

// checkPresented makes cfg count every certificate of a peer chain, and
// the root it verifies to, that is outside its validity at the moment of
// verification.
func checkPresented(cfg *tls.Config, side string, bundle *workloadapi.X509Source, c *counts) *tls.Config {
	verify := cfg.VerifyPeerCertificate
	cfg.VerifyPeerCertificate = func(raw [][]byte, chains [][]*x509.Certificate) error {
		now := time.Now()
		certs := make([]*x509.Certificate, 0, len(raw))
		for _, der := range raw {
			cert, err := x509.ParseCertificate(der)
			if err != nil {
				return fmt.Errorf("soak: peer sent an unparsable certificate: %w", err)
			}
			certs = append(certs, cert)
		}
		check := func(what string, cert *x509.Certificate) {
			if now.Before(cert.NotBefore) || !now.Before(cert.NotAfter) {
				c.mu.Lock()
				c.expired++
				c.example("%s was presented %s serial %s valid %s to %s", side, what, cert.SerialNumber.Text(16),
					cert.NotBefore.Format(time.RFC3339), cert.NotAfter.Format(time.RFC3339))
				c.mu.Unlock()
			}
		}
		for i, cert := range certs {
			check(fmt.Sprintf("chain[%d]", i), cert)
		}
		if len(certs) > 0 {
			if _, verified, err := x509svid.Verify(certs, bundle); err == nil {
				check("root", verified[0][len(verified[0])-1])
			}
		}
		return verify(raw, chains)
	}
	return cfg
}

func exchange(cfg *tls.Config, addr string) error {
	ctx, cancel := context.WithTimeout(context.Background(), callTimeout)
	defer cancel()
	conn, err := (&tls.Dialer{Config: cfg}).DialContext(ctx, "tcp", addr)
	if err != nil {
		return fmt.Errorf("handshake: %w", err)
	}
	defer conn.Close()
	_ = conn.SetDeadline(time.Now().Add(callTimeout))
	const msg = "ping\n"
	if _, err := conn.Write([]byte(msg)); err != nil {
		return fmt.Errorf("write: %w", err)
	}
	got, err := bufio.NewReader(conn).ReadString('\n')
	if err != nil {
		return fmt.Errorf("read: %w", err)
	}
	if got != msg {
		return fmt.Errorf("echo %q, want %q", got, msg)
	}
	return nil
}
