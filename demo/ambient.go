package demo

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/trustmesh/trustmesh/agent/capture"
	"github.com/trustmesh/trustmesh/agent/node"
	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/run"
)

// ErrNeedsRoot is RunAmbient's refusal to run without root: it creates
// network namespaces, veths and iptables rules.
var ErrNeedsRoot = errors.New("demo --ambient needs root: it creates network namespaces, a bridge and veths, and the node proxy installs iptables rules and enters the pods' namespaces (CAP_NET_ADMIN and CAP_SYS_ADMIN); run it with sudo")

// AmbientConfig configures the ambient demo.
type AmbientConfig struct {
	// WorkDir holds the CA's data, the node agent's state, and the mesh and
	// policy files the demo writes; empty means a temporary directory,
	// removed at the end.
	WorkDir string
	// Interval between calls. Default one second.
	Interval time.Duration
	Out      io.Writer
	Log      *slog.Logger
}

// The ambient demo's pods: a client calling a TCP echo server, both
// unmodified apps in their own network namespaces on one node.
const (
	ambientNode      = "node-1"
	ambientServerPod = "server-0"
	ambientClientPod = "client-0"
	ambientPort      = 7070
)

// RunAmbient runs ambient mode on one machine until ctx ends, which is a
// clean exit: two pods as network namespaces on a bridge in a third (the
// node), mesh files declaring them ambient workloads of that node, the
// control plane in this process as `trustmesh serve` runs it off
// Kubernetes, and the node agent with its L4 proxy (`trustmesh node
// --proxy`) in this process too, enrolled with a join token. A TCP echo
// server and its client, unmodified apps that know nothing of the mesh,
// run in the pods; once the proxy captures both, the client calls every
// Interval and each outcome is printed, with the policy file to edit to
// deny it. At the end every namespace is removed, with the rules in it.
func RunAmbient(ctx context.Context, cfg AmbientConfig) (err error) {
	if runtime.GOOS != "linux" {
		return errors.New("demo --ambient runs on Linux only: it needs network namespaces and iptables")
	}
	if os.Geteuid() != 0 {
		return ErrNeedsRoot
	}
	for _, tool := range []string{"ip", "iptables-restore", "nsenter"} {
		if _, err := exec.LookPath(tool); err != nil {
			return fmt.Errorf("demo --ambient needs %s (Debian: apt-get install iproute2 iptables util-linux): %w", tool, err)
		}
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
		dir, err := os.MkdirTemp("", "trustmesh-demo-ambient-")
		if err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		defer os.RemoveAll(dir)
		cfg.WorkDir = dir
	} else if err := os.MkdirAll(cfg.WorkDir, 0o700); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if cfg.WorkDir, err = filepath.Abs(cfg.WorkDir); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	out := &printer{w: cfg.Out}

	tp, err := newAmbientTopology(ctx)
	// Removed however the demo ends, even when it could not finish the
	// topology: namespaces take their veths and rules with them.
	defer func() {
		if rerr := tp.remove(); rerr != nil && err == nil {
			err = rerr
		}
		out.say("removed the network namespaces %s and everything in them", strings.Join(tp.names, ", "))
	}()
	if err != nil {
		return err
	}
	out.say("node %s: network namespace %s, bridge %s; pods %s (%s) and %s (%s), each a network namespace with a veth into it",
		ambientNode, tp.node, tp.nodeIP, ambientClientPod, tp.client.ip, ambientServerPod, tp.server.ip)

	meshDir, policyDir := filepath.Join(cfg.WorkDir, "mesh"), filepath.Join(cfg.WorkDir, "policies")
	policy := filepath.Join(policyDir, "server.yaml")
	for _, d := range []string{meshDir, policyDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
	}
	if err := writeAtomic(filepath.Join(meshDir, "ambient.yaml"), ambientMesh(tp)); err != nil {
		return err
	}
	if err := writeAtomic(policy, AmbientPolicy("ALLOW")); err != nil {
		return err
	}

	authzAddr, err := freeLoopbackPort()
	if err != nil {
		return err
	}
	dataDir := admin.DataDir(filepath.Join(cfg.WorkDir, "data"))
	cp, err := controlplane.New(ctx, controlplane.Config{
		DataDir:     string(dataDir),
		TrustDomain: trustDomain,
		Listen:      controlplane.ListenConfig{CA: "127.0.0.1:0", Monitoring: "127.0.0.1:0", Authz: authzAddr},
		XDS:         controlplane.XDSConfig{MeshDir: meshDir, AuthzAddress: authzAddr},
		Authz:       controlplane.AuthzConfig{PolicyDir: policyDir},
		Kubernetes:  controlplane.KubernetesConfig{Mode: controlplane.KubernetesOff},
		Log:         slog.New(&refusalTap{next: cfg.Log.Handler(), out: out, version: new(atomic.Uint64)}),
	})
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	err = run.Tasks(ctx, cp.Run, func(ctx context.Context) error {
		return runAmbientNode(ctx, cfg, out, dataDir, cp, tp, authzAddr, policy)
	})
	if ctx.Err() != nil && (err == nil || errors.Is(err, context.Canceled)) {
		out.say("stopped")
		return nil
	}
	return err
}

// runAmbientNode enrols and runs the node agent with its proxy, then the
// apps once the proxy captures both pods.
func runAmbientNode(ctx context.Context, cfg AmbientConfig, out *printer, dataDir admin.DataDir, cp *controlplane.ControlPlane, tp *ambientTopology, authzAddr, policy string) error {
	jo := admin.JournalOptions{Log: cfg.Log}
	tb, err := admin.TrustBundle(ctx, dataDir, jo, "")
	if err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	bundle := filepath.Join(cfg.WorkDir, "ca-bundle.pem")
	if err := writeRoots(bundle, tb.X509Authorities()); err != nil {
		return err
	}
	tok, err := admin.CreateNodeJoinToken(ctx, dataDir, jo, ambientNode, 10*time.Minute)
	if err != nil {
		return fmt.Errorf("demo: join token for node %s: %w", ambientNode, err)
	}
	tap := &captureTap{next: cfg.Log.Handler(), st: &captureState{out: out, seen: map[string]bool{}, all: make(chan struct{})}}
	ncfg := node.Config{
		NodeName: ambientNode, CAAddress: cp.Addrs().CA.String(), CABundleFile: bundle, JoinToken: tok,
		StateDir: filepath.Join(cfg.WorkDir, "node", "state"), SocketPath: filepath.Join(cfg.WorkDir, "node", "node.sock"),
		SyncInterval: time.Second, PendingWait: 2 * time.Second,
		Proxy: true, AuthzAddress: authzAddr, NodeIP: tp.nodeIP,
		Logger: slog.New(tap),
	}
	if err := os.MkdirAll(filepath.Dir(ncfg.SocketPath), 0o700); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	out.say("node agent for %s enrolled with a join token; its L4 proxy takes the pods' workloads and the policy revision over xDS", ambientNode)
	return run.Tasks(ctx,
		func(ctx context.Context) error { return node.Run(ctx, ncfg) },
		func(ctx context.Context) error {
			select {
			case <-tap.st.all:
			case <-ctx.Done():
				return nil
			}
			return runAmbientApps(ctx, cfg, out, tp, policy)
		},
	)
}

// runAmbientApps runs the echo server in the server pod and calls it from
// the client pod every Interval. Neither socket carries the proxy's mark:
// they are what any app in the pod would open, and the pod's rules send
// them through the node proxy.
func runAmbientApps(ctx context.Context, cfg AmbientConfig, out *printer, tp *ambientTopology, policy string) error {
	l, err := tp.server.netns.Listen(ctx, "tcp", fmt.Sprintf("0.0.0.0:%d", ambientPort), 0)
	if err != nil {
		return fmt.Errorf("demo: the echo app in %s: %w", ambientServerPod, err)
	}
	target := net.JoinHostPort(tp.server.ip, fmt.Sprint(ambientPort))
	out.say("echo (plain TCP) listens in %s on port %d; the client in %s connects to %s every %s", ambientServerPod, ambientPort, ambientClientPod, target, cfg.Interval)
	out.say("edit %s (change ALLOW to DENY) to refuse the client; change it back to allow it again", policy)
	return run.Tasks(ctx,
		func(ctx context.Context) error {
			go func() { <-ctx.Done(); l.Close() }()
			for {
				c, err := l.Accept()
				if err != nil {
					if ctx.Err() != nil {
						return nil
					}
					return fmt.Errorf("demo: echo app: %w", err)
				}
				go serveEcho(c)
			}
		},
		func(ctx context.Context) error {
			t := time.NewTicker(cfg.Interval)
			defer t.Stop()
			for n := 1; ; n++ {
				reply, err := callEcho(ctx, tp.client.netns, target, n)
				switch {
				case ctx.Err() != nil:
					return nil
				case err != nil:
					out.say("call %d: refused: %v (the node proxy resets a connection the policy denies: see %s)", n, err, policy)
				default:
					out.say("call %d: OK through the node proxy (HBONE, mTLS, authorized): %s", n, reply)
				}
				select {
				case <-ctx.Done():
					return nil
				case <-t.C:
				}
			}
		},
	)
}

func serveEcho(c net.Conn) {
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(10 * time.Second))
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return
	}
	fmt.Fprintf(c, "%s echoes %s", ambientServerPod, line)
}

// callEcho is one call of the client app: connect, send a line, read the
// answer.
func callEcho(ctx context.Context, ns capture.Netns, target string, n int) (string, error) {
	ctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	c, err := ns.Dial(ctx, "tcp", target, 0)
	if err != nil {
		return "", err
	}
	defer c.Close()
	dl, _ := ctx.Deadline()
	_ = c.SetDeadline(dl)
	if _, err := fmt.Fprintf(c, "call %d\n", n); err != nil {
		return "", err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		if errors.Is(err, io.EOF) {
			return "", errors.New("connection closed without an answer")
		}
		return "", err
	}
	return strings.TrimSpace(line), nil
}

// AmbientPolicy is the demo's policy on the server, with action ALLOW or
// DENY for the client's principal.
func AmbientPolicy(action string) string {
	return `# The node proxy asks the control plane about every connection to the
# server pod with this policy. Change ALLOW to DENY to refuse the client:
# new connections are reset, and open ones are closed.
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: server, namespace: demo}
spec:
  selector:
    matchLabels: {app: server}
  action: ` + action + `
  rules:
  - from:
    - source:
        principals: ["cluster.local/ns/demo/sa/client"]
`
}

// ambientMesh declares the two pods as ambient workloads of the node, and
// the node's entries that let it hold their identities by netns.
func ambientMesh(tp *ambientTopology) string {
	wl := func(name, sa, labels string, p ambientPod) string {
		return fmt.Sprintf(`---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: %s, namespace: demo}
spec:
  spiffeID: spiffe://cluster.local/ns/demo/sa/%s
  node: %s
  addresses: [%s]
  dataplaneMode: ambient
  netns: %s
  labels: %s
`, name, sa, ambientNode, p.ip, p.name, labels)
	}
	return wl(ambientClientPod, clientSA, "{app: client}", tp.client) +
		wl(ambientServerPod, "server", "{app: server}", tp.server) +
		fmt.Sprintf(`---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: %s}
spec:
  workloads:
  - spiffeID: spiffe://cluster.local/ns/demo/sa/%s
    selectors: {netns: %s}
  - spiffeID: spiffe://cluster.local/ns/demo/sa/server
    selectors: {netns: %s}
`, ambientNode, clientSA, tp.client.name, tp.server.name)
}

func writeAtomic(path, content string) error {
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	return nil
}

func freeLoopbackPort() (string, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return "", fmt.Errorf("demo: %w", err)
	}
	defer l.Close()
	return l.Addr().String(), nil
}

// captureState follows the node proxy's "capturing an ambient pod" lines:
// the calls start once both pods are captured, since before that they
// would talk in plaintext and prove nothing.
type captureState struct {
	out  *printer
	mu   sync.Mutex
	seen map[string]bool
	all  chan struct{}
}

// captureTap passes records on to next and watches for captures.
type captureTap struct {
	next slog.Handler
	st   *captureState
}

func (h *captureTap) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || h.next.Enabled(ctx, l)
}

func (h *captureTap) Handle(ctx context.Context, r slog.Record) error {
	if r.Message == "capturing an ambient pod" {
		var wl, ns string
		r.Attrs(func(a slog.Attr) bool {
			switch a.Key {
			case "workload":
				wl = a.Value.String()
			case "netns":
				ns = a.Value.String()
			}
			return true
		})
		h.st.mu.Lock()
		if !h.st.seen[wl] {
			h.st.seen[wl] = true
			h.st.out.say("the node proxy captures %s (%s): its outbound TCP goes through the proxy over HBONE, its inbound only by HBONE", wl, ns)
			if h.st.seen["demo/"+ambientClientPod] && h.st.seen["demo/"+ambientServerPod] {
				close(h.st.all)
			}
		}
		h.st.mu.Unlock()
	}
	if h.next.Enabled(ctx, r.Level) {
		return h.next.Handle(ctx, r)
	}
	return nil
}

func (h *captureTap) WithAttrs(as []slog.Attr) slog.Handler {
	return &captureTap{next: h.next.WithAttrs(as), st: h.st}
}

func (h *captureTap) WithGroup(name string) slog.Handler {
	return &captureTap{next: h.next.WithGroup(name), st: h.st}
}

// ambientTopology is one node's network namespace with a bridge, and a
// network namespace per pod with a veth into the bridge.
type ambientTopology struct {
	node, nodeIP   string
	client, server ambientPod
	names          []string // every namespace made, for removal
}

type ambientPod struct {
	name, ip string
	netns    capture.Netns
}

// newAmbientTopology makes the namespaces, named after this process so that
// two demos do not collide. It returns what it made even on error, for
// remove.
func newAmbientTopology(ctx context.Context) (*ambientTopology, error) {
	prefix := fmt.Sprintf("tmdemo%d", os.Getpid()%100000)
	// A subnet per process too: pods of two demos must not share addresses
	// even though their bridges are apart, since the host routes neither.
	sub := fmt.Sprintf("10.%d.%d", 100+os.Getpid()%100, os.Getpid()/100%250)
	tp := &ambientTopology{node: prefix + "-node", nodeIP: sub + ".1"}
	tp.client = ambientPod{name: prefix + "-client", ip: sub + ".2"}
	tp.server = ambientPod{name: prefix + "-server", ip: sub + ".3"}
	ip := func(args ...string) error {
		out, err := exec.CommandContext(ctx, "ip", args...).CombinedOutput()
		if err != nil {
			return fmt.Errorf("demo: ip %s: %w: %s", strings.Join(args, " "), err, strings.TrimSpace(string(out)))
		}
		return nil
	}
	for _, ns := range []string{tp.node, tp.client.name, tp.server.name} {
		if err := ip("netns", "add", ns); err != nil {
			return tp, err
		}
		tp.names = append(tp.names, ns)
		if err := ip("-n", ns, "link", "set", "lo", "up"); err != nil {
			return tp, err
		}
	}
	if err := ip("-n", tp.node, "link", "add", "br0", "type", "bridge", "forward_delay", "0"); err != nil {
		return tp, err
	}
	if err := ip("-n", tp.node, "addr", "add", tp.nodeIP+"/24", "dev", "br0"); err != nil {
		return tp, err
	}
	if err := ip("-n", tp.node, "link", "set", "br0", "up"); err != nil {
		return tp, err
	}
	for i, p := range []*ambientPod{&tp.client, &tp.server} {
		p.netns = capture.NetnsByName(p.name)
		host := fmt.Sprintf("veth%d", i)
		for _, args := range [][]string{
			{"-n", tp.node, "link", "add", host, "type", "veth", "peer", "name", "eth0", "netns", p.name},
			{"-n", tp.node, "link", "set", host, "master", "br0"},
			{"-n", tp.node, "link", "set", host, "up"},
			{"-n", p.name, "addr", "add", p.ip + "/24", "dev", "eth0"},
			{"-n", p.name, "link", "set", "eth0", "up"},
			{"-n", p.name, "route", "add", "default", "via", tp.nodeIP},
		} {
			if err := ip(args...); err != nil {
				return tp, err
			}
		}
	}
	return tp, nil
}

// remove deletes every namespace made; their veths, bridge and the proxy's
// rules go with them.
func (tp *ambientTopology) remove() error {
	var errs []error
	for _, ns := range tp.names {
		if out, err := exec.Command("ip", "netns", "del", ns).CombinedOutput(); err != nil {
			errs = append(errs, fmt.Errorf("demo: removing network namespace %s: %w: %s", ns, err, strings.TrimSpace(string(out))))
		}
	}
	return errors.Join(errs...)
}
