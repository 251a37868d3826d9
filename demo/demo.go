// Package demo runs a mesh on one machine: the control plane (the CA and
// the xDS server on its port), built from controlplane.Config as `trustmesh
// serve` builds it, two workload agents enrolled with join tokens, and two
// proxyless grpc-go workloads, an echo server and its client, that get
// their certificates from the agents (--cert-dir files) and their
// configuration, mTLS and RBAC included, from the xDS server. It prints,
// one line each, every call's outcome, every policy push, every policy edit
// refused and every certificate rotation, until its context ends. Its mesh
// is embedded (examples.Mesh) and copied to a directory that it watches, so
// it runs from anywhere and its policy can be edited while it runs.
package demo

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	xdscreds "google.golang.org/grpc/credentials/xds"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"
	grpcxds "google.golang.org/grpc/xds"

	"github.com/trustmesh/trustmesh/agent"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/examples"
	"github.com/trustmesh/trustmesh/internal/run"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// Config configures the demo.
type Config struct {
	// MeshDir and PoliciesDir are watched: edits take effect live. An
	// empty MeshDir is the embedded mesh (examples/mesh), copied to
	// WorkDir/mesh unless that directory exists already; an empty
	// PoliciesDir is MeshDir/policies.
	MeshDir, PoliciesDir string
	// Mesh is the mesh copied when MeshDir is empty; nil is the embedded
	// one, examples.Mesh().
	Mesh fs.FS
	// WorkDir holds the CA's data, the agents' sockets and certificate
	// directories, and the copy of the embedded mesh; empty means a
	// temporary directory, removed at the end.
	WorkDir string
	// CertTTL is the workloads' certificate lifetime; they rotate at half
	// of it. Default one minute.
	CertTTL time.Duration
	// Interval between calls. Default one second.
	Interval time.Duration
	Out      io.Writer
	Log      *slog.Logger
}

// The demo's workloads, as examples/mesh declares them.
const (
	namespace  = "demo"
	echoPod    = "echo-0"
	echoSA     = "echo"
	clientPod  = "client-0"
	clientSA   = "client"
	echoTarget = "xds:///echo.demo.svc.cluster.local:7070"
)

// trustDomain is the demo's, as examples/mesh names its workloads.
const trustDomain = "cluster.local"

// Run runs the demo until ctx ends, which is a clean exit.
func Run(ctx context.Context, cfg Config) (err error) {
	if cfg.CertTTL <= 0 {
		cfg.CertTTL = time.Minute
	}
	if cfg.Interval <= 0 {
		cfg.Interval = time.Second
	}
	if cfg.Out == nil {
		cfg.Out = os.Stdout
	}
	if cfg.Log == nil {
		cfg.Log = slog.New(slog.DiscardHandler)
	}
	if cfg.WorkDir == "" {
		dir, err := os.MkdirTemp("", "trustmesh-demo-")
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		defer os.RemoveAll(dir)
		cfg.WorkDir = dir
	} else if err := os.MkdirAll(cfg.WorkDir, 0o700); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	// Absolute, so that the paths the demo prints name the files to edit
	// from any directory.
	if cfg.WorkDir, err = filepath.Abs(cfg.WorkDir); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	out := &printer{w: cfg.Out}
	if cfg.MeshDir == "" {
		dir := filepath.Join(cfg.WorkDir, "mesh")
		from := cfg.Mesh
		if from == nil {
			from = examples.Mesh()
		}
		copied, err := copyMesh(from, dir)
		if err != nil {
			return err
		}
		if copied {
			out.say("the demo's mesh is in %s (a copy of the one built in)", dir)
		} else {
			out.say("the demo's mesh is in %s (kept from an earlier run; remove it for a fresh copy)", dir)
		}
		cfg.MeshDir = dir
	}
	if cfg.PoliciesDir == "" {
		cfg.PoliciesDir = filepath.Join(cfg.MeshDir, "policies")
	}
	m, err := (&mesh.Dir{Path: cfg.MeshDir}).Mesh()
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	echo := m.Workload(namespace, echoPod)
	client := m.Workload(namespace, clientPod)
	if echo == nil || client == nil || m.Service(namespace+"/echo") == nil {
		return fmt.Errorf("demo: %s must declare pods %s/%s and %s/%s and service %s/echo (see examples/mesh)",
			cfg.MeshDir, namespace, echoPod, namespace, clientPod, namespace)
	}
	var echoAddr string
	for _, e := range m.Service(namespace + "/echo").Endpoints {
		if e.Workload.Key() == echo.Key() {
			echoAddr = net.JoinHostPort(e.Address, fmt.Sprint(e.TargetPort(m.Service(namespace + "/echo").Ports[0])))
		}
	}

	// The control plane, as `trustmesh serve` runs it off Kubernetes: the
	// CA, and on its port the xDS server, from the mesh and policy
	// directories.
	dataDir := admin.DataDir(filepath.Join(cfg.WorkDir, "data"))
	cp, err := controlplane.New(ctx, controlplane.Config{
		DataDir:     string(dataDir),
		TrustDomain: trustDomain,
		Listen:      controlplane.ListenConfig{CA: "127.0.0.1:0", Monitoring: "127.0.0.1:0", Authz: "off"},
		CA:          controlplane.CAConfig{MinWorkloadTTL: cfg.CertTTL},
		XDS:         controlplane.XDSConfig{MeshDir: cfg.MeshDir, AuthzAddress: "127.0.0.1:9191"},
		Authz:       controlplane.AuthzConfig{PolicyDir: cfg.PoliciesDir},
		Kubernetes:  controlplane.KubernetesConfig{Mode: controlplane.KubernetesOff},
		Log:         slog.New(&refusalTap{next: cfg.Log.Handler(), out: out, version: new(atomic.Uint64)}),
	})
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	err = run.Tasks(ctx, cp.Run, func(ctx context.Context) error {
		return runMesh(ctx, cfg, out, dataDir, cp, echo, client, echoAddr)
	})
	if ctx.Err() != nil && (err == nil || errors.Is(err, context.Canceled)) {
		out.say("stopped")
		return nil
	}
	return err
}

// runMesh runs two agents, enrolled with join tokens and writing --cert-dir
// files, and the workloads that use them. The bundle and the tokens come
// from the CA's operator API, as `trustmesh ca bundle` and `trustmesh ca
// token` give them.
func runMesh(ctx context.Context, cfg Config, out *printer, dataDir admin.DataDir, cp *controlplane.ControlPlane, echo, client *mesh.Workload, echoAddr string) error {
	addrs := cp.Addrs()
	jo := admin.JournalOptions{Log: cfg.Log}
	tb, err := admin.TrustBundle(ctx, dataDir, jo, "")
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	bundle := filepath.Join(cfg.WorkDir, "ca-bundle.pem")
	if err := writeRoots(bundle, tb.X509Authorities()); err != nil {
		return err
	}
	dirs := map[string]string{}
	var tasks []run.Task
	for _, w := range []struct{ pod, sa string }{{echoPod, echoSA}, {clientPod, clientSA}} {
		id := spiffeid.RequireFromSegments(tb.TrustDomain(), "ns", namespace, "sa", w.sa)
		tok, err := admin.CreateJoinToken(ctx, dataDir, jo, id.String(), 10*time.Minute)
		if err != nil {
			return fmt.Errorf("demo: join token for %s: %w", id, err)
		}
		dir := filepath.Join(cfg.WorkDir, w.pod)
		dirs[w.pod] = dir
		acfg := agent.Config{
			CAAddress: addrs.CA.String(), CABundleFile: bundle, JoinToken: tok, CertTTL: cfg.CertTTL,
			SocketPath: filepath.Join(cfg.WorkDir, w.pod+".sock"), CertDir: dir, Logger: cfg.Log,
		}
		tasks = append(tasks, func(ctx context.Context) error { return agent.Run(ctx, acfg) })
		out.say("agent for %s enrolled with a join token; certificates in %s", id, dir)
	}
	return run.Tasks(ctx, append(tasks, func(ctx context.Context) error {
		return runWorkloads(ctx, cfg, out, cp, dirs, echo, client, echoAddr)
	})...)
}

// runWorkloads runs the echo server and its client, proxyless grpc-go over
// xDS from the control plane's CA port, once the agents have written their
// certificates, and prints what happens until ctx ends.
func runWorkloads(ctx context.Context, cfg Config, out *printer, cp *controlplane.ControlPlane, dirs map[string]string, echo, client *mesh.Workload, echoAddr string) error {
	for _, pod := range []string{echoPod, clientPod} {
		if err := waitForFile(ctx, filepath.Join(dirs[pod], "cert-chain.pem")); err != nil {
			return err
		}
	}
	xdsAddr := cp.Addrs().CA.String()
	bootstrap := func(pod, sa string, labels map[string]string) []byte {
		return bootstrapJSON(xdsAddr, dirs[pod], fmt.Sprintf("sidecar~127.0.0.1~%s.%s~%s.svc.cluster.local", pod, namespace, namespace), sa, labels)
	}
	screds, err := xdscreds.NewServerCredentials(xdscreds.ServerOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	// The echo server reports its serving mode itself: without this
	// callback grpc-go logs every change at ERROR, "entering mode:
	// SERVING" included, since ERROR is its only level shown by default
	// and gRFC A36 asks for serving resumptions to be visible. SERVING is
	// news, not an error; NOT_SERVING is a warning, as the listener keeps
	// trying.
	//
	// The client's first call waits for the first SERVING: a connection
	// the echo server accepts before it has its listener is closed, and
	// the client's channel then backs off for a second, longer than the
	// first call's deadline.
	serving := make(chan struct{})
	var servingOnce sync.Once
	modes := grpcxds.ServingModeCallback(func(addr net.Addr, args grpcxds.ServingModeChangeArgs) {
		if args.Mode == connectivity.ServingModeServing {
			out.say("echo serves on %s: its listener and RBAC came from the xDS server", addr)
			servingOnce.Do(func() { close(serving) })
			return
		}
		out.say("echo stopped serving on %s: %v", addr, args.Err)
		cfg.Log.Warn("echo workload not serving", "address", addr.String(), "error", args.Err)
	})
	echoSrv, err := grpcxds.NewGRPCServer(grpc.Creds(screds), modes, grpcxds.BootstrapContentsForTesting(bootstrap(echoPod, echoSA, echo.Labels)))
	if err != nil {
		return fmt.Errorf("demo: echo server: %w", err)
	}
	healthpb.RegisterHealthServer(echoSrv, health.NewServer())
	lis, err := net.Listen("tcp", echoAddr)
	if err != nil {
		return fmt.Errorf("demo: the echo workload listens on %s: %w", echoAddr, err)
	}
	resolver, err := grpcxds.NewXDSResolverWithConfigForTesting(bootstrap(clientPod, clientSA, client.Labels))
	if err != nil {
		lis.Close()
		return fmt.Errorf("demo: %w", err)
	}
	ccreds, err := xdscreds.NewClientCredentials(xdscreds.ClientOptions{FallbackCreds: insecure.NewCredentials()})
	if err != nil {
		lis.Close()
		return fmt.Errorf("demo: %w", err)
	}
	conn, err := grpc.NewClient(echoTarget, grpc.WithTransportCredentials(ccreds), grpc.WithResolvers(resolver))
	if err != nil {
		lis.Close()
		return fmt.Errorf("demo: %w", err)
	}
	defer conn.Close()
	out.say("echo listens on %s; the client calls %s every %s. Edit %s to change who may call.", echoAddr, echoTarget, cfg.Interval, policyFile(cfg.PoliciesDir))

	return run.Tasks(ctx,
		func(ctx context.Context) error {
			go func() { <-ctx.Done(); echoSrv.Stop() }()
			if err := echoSrv.Serve(lis); err != nil && ctx.Err() == nil {
				return fmt.Errorf("demo: echo server: %w", err)
			}
			return nil
		},
		func(ctx context.Context) error { return watchRotations(ctx, out, dirs, cfg.Interval) },
		func(ctx context.Context) error { return watchPushes(ctx, out, cp, cfg.Interval) },
		func(ctx context.Context) error {
			// Not forever: an echo server that never gets its listener
			// is shown by the calls that fail.
			select {
			case <-serving:
			case <-time.After(firstServingWait):
			case <-ctx.Done():
				return nil
			}
			return call(ctx, out, healthpb.NewHealthClient(conn), cfg.Interval)
		},
	)
}

// firstServingWait is how long the client waits for the echo server's
// first SERVING before it calls anyway.
const firstServingWait = 10 * time.Second

type printer struct {
	mu sync.Mutex
	w  io.Writer
}

func (p *printer) say(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	fmt.Fprintf(p.w, "%s  %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

func writeRoots(path string, roots []*x509.Certificate) error {
	var b []byte
	for _, r := range roots {
		b = append(b, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: r.Raw})...)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	return nil
}

// bootstrapJSON is a grpc-go xDS bootstrap: the xDS server over mTLS with
// the agent's files, and those files as the file_watcher provider.
func bootstrapJSON(xdsAddr, certDir, nodeID, sa string, labels map[string]string) []byte {
	files := map[string]any{
		"certificate_file":    filepath.Join(certDir, "cert-chain.pem"),
		"private_key_file":    filepath.Join(certDir, "key.pem"),
		"ca_certificate_file": filepath.Join(certDir, "root-cert.pem"),
	}
	provider := map[string]any{"refresh_interval": "1s"}
	for k, v := range files {
		provider[k] = v
	}
	l := map[string]any{}
	for k, v := range labels {
		l[k] = v
	}
	b, _ := json.Marshal(map[string]any{
		"xds_servers": []any{map[string]any{
			"server_uri":      xdsAddr,
			"channel_creds":   []any{map[string]any{"type": "tls", "config": files}},
			"server_features": []any{"xds_v3"},
		}},
		"node": map[string]any{"id": nodeID, "metadata": map[string]any{
			proxyconfig.MetaServiceAccount: sa, proxyconfig.MetaNamespace: namespace,
			proxyconfig.MetaGenerator: proxyconfig.GeneratorGRPC, proxyconfig.MetaLabels: l,
		}},
		"certificate_providers": map[string]any{
			proxyconfig.ProxylessCertProvider: map[string]any{"plugin_name": "file_watcher", "config": provider},
		},
		"server_listener_resource_name_template": proxyconfig.ProxylessInboundPrefix + "%s",
	})
	return b
}

func waitForFile(ctx context.Context, path string) error {
	t := time.NewTicker(50 * time.Millisecond)
	defer t.Stop()
	for {
		if _, err := os.Stat(path); err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("demo: waiting for %s: %w", path, ctx.Err())
		case <-t.C:
		}
	}
}

// call calls the echo service at every tick and prints the outcome.
func call(ctx context.Context, out *printer, c healthpb.HealthClient, every time.Duration) error {
	t := time.NewTicker(every)
	defer t.Stop()
	for n := 1; ; n++ {
		cctx, cancel := context.WithTimeout(ctx, every*5)
		_, err := c.Check(cctx, &healthpb.HealthCheckRequest{}, grpc.WaitForReady(true))
		cancel()
		switch {
		case ctx.Err() != nil:
			return nil
		case err == nil:
			out.say("call %d: OK over mTLS (client → echo, authorized by RBAC from the xDS server)", n)
		default:
			out.say("call %d: %s: %s", n, status.Code(err), status.Convert(err).Message())
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

// watchPushes prints every configuration push (a policy or mesh edit).
func watchPushes(ctx context.Context, out *printer, cp *controlplane.ControlPlane, every time.Duration) error {
	t := time.NewTicker(every / 4)
	defer t.Stop()
	var last uint64
	for {
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
		if p := cp.XDSPushes(); p != last {
			if last != 0 {
				out.say("xDS push %d: the policies or the mesh changed; new RBAC sent to the workloads", p)
			}
			last = p
		}
	}
}

// watchRotations prints each workload certificate change with its serial.
func watchRotations(ctx context.Context, out *printer, dirs map[string]string, every time.Duration) error {
	t := time.NewTicker(every / 2)
	defer t.Stop()
	serials := map[string]string{}
	for {
		for pod, dir := range dirs {
			leaf, err := readLeaf(filepath.Join(dir, "cert-chain.pem"))
			if err != nil {
				continue
			}
			serial := fmt.Sprintf("%x", leaf.SerialNumber)
			switch prev := serials[pod]; {
			case prev == "":
				out.say("%s certificate serial %s, %s, expires %s", pod, serial, leaf.URIs[0], leaf.NotAfter.Format("15:04:05"))
			case prev != serial:
				out.say("%s certificate rotated: serial %s → %s, expires %s", pod, prev, serial, leaf.NotAfter.Format("15:04:05"))
			}
			serials[pod] = serial
		}
		select {
		case <-ctx.Done():
			return nil
		case <-t.C:
		}
	}
}

func readLeaf(path string) (*x509.Certificate, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	blk, _ := pem.Decode(b)
	if blk == nil {
		return nil, errors.New("no PEM")
	}
	c, err := x509.ParseCertificate(blk.Bytes)
	if err != nil {
		return nil, err
	}
	if len(c.URIs) == 0 {
		return nil, errors.New("no URI")
	}
	return c, nil
}

// copyMesh copies the embedded mesh to dir, unless dir exists: then it is
// the copy an earlier run made with --work-dir, maybe edited, and is kept.
// The copy is built aside and renamed into place, so an interrupted copy
// leaves no half a mesh.
func copyMesh(from fs.FS, dir string) (copied bool, err error) {
	if _, err := os.Stat(dir); err == nil {
		return false, nil
	} else if !errors.Is(err, fs.ErrNotExist) {
		return false, fmt.Errorf("demo: %w", err)
	}
	tmp, err := os.MkdirTemp(filepath.Dir(dir), ".mesh-")
	if err != nil {
		return false, fmt.Errorf("demo: copying the mesh: %w", err)
	}
	defer os.RemoveAll(tmp) // gone once renamed
	if err := os.CopyFS(tmp, from); err != nil {
		return false, fmt.Errorf("demo: copying the mesh: %w", err)
	}
	if err := os.Rename(tmp, dir); err != nil {
		return false, fmt.Errorf("demo: copying the mesh: %w", err)
	}
	return true, nil
}

// policyFile names what to edit: the one policy file in dir, or dir.
func policyFile(dir string) string {
	var files []string
	for _, pattern := range []string{"*.yaml", "*.yml"} {
		m, _ := filepath.Glob(filepath.Join(dir, pattern))
		files = append(files, m...)
	}
	if len(files) == 1 {
		return files[0]
	}
	return dir
}

// refusalTap passes the control plane's log records on to the demo's
// logger and prints a line for each policy update the policy feed
// refused, which the control plane reports only in its log: a record
// whose error wraps source.ErrRefused. The version still enforced is the
// last policy_version a record named.
type refusalTap struct {
	next slog.Handler
	out  *printer
	// version is shared by the handlers WithAttrs and WithGroup derive.
	version *atomic.Uint64
}

func (h *refusalTap) Enabled(ctx context.Context, l slog.Level) bool {
	// Publications are at Info, refusals at Error: the tap sees both
	// whatever the demo's log level.
	return l >= slog.LevelInfo || h.next.Enabled(ctx, l)
}

func (h *refusalTap) Handle(ctx context.Context, r slog.Record) error {
	var refused error
	var version uint64
	r.Attrs(func(a slog.Attr) bool {
		if err, ok := a.Value.Any().(error); ok && errors.Is(err, source.ErrRefused) {
			refused = err
		}
		if a.Key == "policy_version" && a.Value.Kind() == slog.KindUint64 {
			version = a.Value.Uint64()
		}
		return true
	})
	switch {
	case refused != nil:
		kept := "no policy"
		if v := h.version.Load(); v > 0 {
			kept = fmt.Sprintf("version %d", v)
		}
		h.out.say("policy refused: %v (still enforcing %s)", refusalCause(refused), kept)
	case version > 0:
		h.version.Store(version)
	}
	if !h.next.Enabled(ctx, r.Level) {
		return nil
	}
	return h.next.Handle(ctx, r)
}

func (h *refusalTap) WithAttrs(as []slog.Attr) slog.Handler {
	return &refusalTap{next: h.next.WithAttrs(as), out: h.out, version: h.version}
}

func (h *refusalTap) WithGroup(name string) slog.Handler {
	return &refusalTap{next: h.next.WithGroup(name), out: h.out, version: h.version}
}

// refusalCause is what made the feed refuse: err without the
// source.ErrRefused it is wrapped in, which says what follows from it.
func refusalCause(err error) error {
	if u, ok := err.(interface{ Unwrap() []error }); ok {
		if errs := u.Unwrap(); len(errs) > 0 && !errors.Is(errs[len(errs)-1], source.ErrRefused) {
			return errs[len(errs)-1]
		}
	}
	return err
}
