package kube_test

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"
	pb "istio.io/api/security/v1alpha1"
	authv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	clocktesting "k8s.io/utils/clock/testing"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/test/kubeapi"
	"github.com/trustmesh/trustmesh/xds"
)

const clusterType = "type.googleapis.com/envoy.config.cluster.v3.Cluster"

// staleLimit is the replicas' --kube-stale-cache-limit: shorter than the
// default, so that the test shows the setting is the one applied.
const staleLimit = 4 * time.Minute

// restartableAPIServer is envtest's kube-apiserver and etcd, with the
// apiserver's certificates in a directory of the test's, so that the
// apiserver can be stopped and started again on the same port, with the same
// serving and token-signing keys, over the same etcd, and clients reconnect
// to it as to one that restarted. etcd keeps running: the fault is the
// apiserver's, and its data must outlive it.
type restartableAPIServer struct {
	env   *envtest.Environment
	cfg   *rest.Config
	certs string // its --cert-dir, which names its process
}

func startAPIServer(t *testing.T) *restartableAPIServer {
	t.Helper()
	assets, err := kubeapi.Assets()
	if err != nil {
		t.Fatal(err)
	}
	certs, err := os.MkdirTemp("", "tm-kubefault-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(certs) })
	// Bringing it up, and stopping it (it drains its watches first), can take
	// longer than envtest's 20 s defaults on a loaded machine (make test
	// runs packages in parallel).
	env := &envtest.Environment{BinaryAssetsDirectory: assets,
		ControlPlaneStartTimeout: time.Minute, ControlPlaneStopTimeout: time.Minute}
	api := env.ControlPlane.GetAPIServer()
	api.CertDir = certs
	api.Configure().Set("advertise-address", "127.0.0.1").Set("endpoint-reconciler-type", "none")
	cfg, err := env.Start()
	if err != nil {
		t.Fatalf("start envtest with assets in %s: %v", assets, err)
	}
	t.Cleanup(func() {
		if err := env.Stop(); err != nil {
			t.Errorf("stop envtest: %v", err)
		}
	})
	paths, err := kubeapi.IstioCRDs()
	if err == nil {
		_, err = envtest.InstallCRDs(cfg, envtest.CRDInstallOptions{Paths: paths, ErrorIfPathMissing: true})
	}
	if err != nil {
		t.Fatalf("install Istio CRDs: %v", err)
	}
	return &restartableAPIServer{env: env, cfg: cfg, certs: certs}
}

func (a *restartableAPIServer) stop(t *testing.T) {
	t.Helper()
	// The apiserver dies at once (SIGKILL), as a crashed or partitioned one
	// does, rather than draining its watches, which it may take longer than
	// a test can wait for; envtest's Stop then reaps it. etcd and its data
	// stay, so the same apiserver comes back with the same state.
	pid := a.pid(t)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill kube-apiserver (pid %d): %v", pid, err)
	}
	if err := a.env.ControlPlane.GetAPIServer().Stop(); err != nil {
		t.Fatalf("stop kube-apiserver: %v", err)
	}
}

// pid finds the kube-apiserver process by its --cert-dir, which is this
// test's own temporary directory.
func (a *restartableAPIServer) pid(t *testing.T) int {
	t.Helper()
	procs, err := filepath.Glob("/proc/[0-9]*/cmdline")
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		if len(args) == 0 || filepath.Base(args[0]) != "kube-apiserver" {
			continue
		}
		for _, arg := range args {
			if strings.HasPrefix(arg, "--cert-dir=") && strings.TrimPrefix(arg, "--cert-dir=") == a.certs {
				pid, err := strconv.Atoi(filepath.Base(filepath.Dir(p)))
				if err != nil {
					t.Fatal(err)
				}
				return pid
			}
		}
	}
	t.Fatalf("no kube-apiserver process with --cert-dir=%s", a.certs)
	return 0
}

func (a *restartableAPIServer) start(t *testing.T) {
	t.Helper()
	if err := a.env.ControlPlane.GetAPIServer().Start(); err != nil {
		t.Fatalf("start kube-apiserver again: %v", err)
	}
}

// logBuffer collects a control plane's log lines.
type logBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *logBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *logBuffer) count(s string) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Count(l.b.String(), s)
}

type replica struct {
	cp    *controlplane.ControlPlane
	roots []*x509.Certificate // read at start, while the apiserver is up
	log   *logBuffer
	stop  func()
}

func startReplica(t *testing.T, kc *rest.Config, clk *clocktesting.FakeClock) *replica {
	t.Helper()
	r := &replica{log: &logBuffer{}}
	cfg := controlplane.Config{
		DataDir: t.TempDir(),
		Listen: controlplane.ListenConfig{
			CA: "127.0.0.1:0", Monitoring: "127.0.0.1:0", Injector: "127.0.0.1:0", Authz: "127.0.0.1:0",
		},
		Kubernetes: controlplane.KubernetesConfig{Mode: controlplane.KubernetesOn, RestConfig: kc},
		CA:         controlplane.CAConfig{Secret: "trustmesh-system/trustmesh-ca", KubeStaleCacheLimit: staleLimit},
		Rotation:   controlplane.RotationConfig{Interval: time.Minute},
		Clock:      clk,
		Log:        slog.New(slog.NewTextHandler(r.log, nil)),
	}
	ctx, cancel := context.WithCancel(context.Background())
	cp, err := controlplane.New(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	mat, _, err := cp.Rotation().Material(ctx, clk.Now())
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	r.roots = mat.Roots
	done := make(chan error, 1)
	go func() { done <- cp.Run(ctx) }()
	var once sync.Once
	r.cp = cp
	r.stop = func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				t.Errorf("control plane Run() = %v", err)
			}
		})
	}
	t.Cleanup(r.stop)
	return r
}

type workloadKey struct {
	key   crypto.Signer
	chain [][]byte
}

func newWorkloadKey(t *testing.T) *workloadKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &workloadKey{key: k}
}

func (w *workloadKey) csr(t *testing.T) string {
	der, err := x509.CreateCertificateRequest(rand.Reader, &x509.CertificateRequest{}, w.key)
	if err != nil {
		t.Fatal(err)
	}
	return string(pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE REQUEST", Bytes: der}))
}

// dial connects to a replica's CA port as a workload: trusting its bundle,
// presenting w's certificate when it has one.
func dial(t *testing.T, r *replica, w *workloadKey, clk *clocktesting.FakeClock) *grpc.ClientConn {
	t.Helper()
	roots := x509.NewCertPool()
	for _, c := range r.roots {
		roots.AddCert(c)
	}
	cfg := &tls.Config{RootCAs: roots, ServerName: "localhost", Time: clk.Now, MinVersion: tls.VersionTLS12}
	if w != nil && w.chain != nil {
		cfg.Certificates = []tls.Certificate{{Certificate: w.chain, PrivateKey: w.key}}
	}
	conn, err := grpc.NewClient(r.cp.Addrs().CA.String(), grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return conn
}

// issue asks for a certificate with a token, or by renewal with w's
// certificate when token is empty, and keeps it as w's.
func issue(t *testing.T, r *replica, w *workloadKey, token string, clk *clocktesting.FakeClock) error {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if token != "" {
		ctx = metadata.NewOutgoingContext(ctx, metadata.Pairs("Authorization", "Bearer "+token))
	}
	// Each call's connection closes with it: a test that polls would
	// otherwise pile up open connections until the server's connection
	// cap (connlimit.DefaultMaxConnections) stops accepting new ones.
	conn := dial(t, r, w, clk)
	defer conn.Close()
	resp, err := pb.NewIstioCertificateServiceClient(conn).CreateCertificate(ctx,
		&pb.IstioCertificateRequest{Csr: w.csr(t), ValidityDuration: int64(time.Hour / time.Second)})
	if err != nil {
		return err
	}
	var chain [][]byte
	for _, p := range resp.GetCertChain()[:2] {
		b, _ := pem.Decode([]byte(p))
		if b == nil {
			t.Fatalf("chain element is not PEM: %q", p)
		}
		chain = append(chain, b.Bytes)
	}
	w.chain = chain
	return nil
}

// clusters asks a replica, over ADS as a sidecar of team-a/web with w's
// certificate, for its clusters, and returns their names and the version.
func clusters(t *testing.T, r *replica, w *workloadKey, clk *clocktesting.FakeClock) ([]string, string, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	conn := dial(t, r, w, clk) // closed with the call, as issue's
	defer conn.Close()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		return nil, "", err
	}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: adsNode(), TypeUrl: clusterType}); err != nil {
		return nil, "", err
	}
	resp, err := stream.Recv()
	if err != nil {
		return nil, "", err
	}
	var names []string
	for _, res := range resp.Resources {
		names = append(names, string(res.Value)) // compared whole: the same resources, byte for byte
	}
	slices.Sort(names)
	return names, resp.VersionInfo, nil
}

// adsNode is the sidecar of team-a/web that asks for configuration.
func adsNode() *corev3.Node {
	md, _ := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": "web", "NAMESPACE": "team-a"})
	return &corev3.Node{Id: "sidecar~10.0.0.5~web-0.team-a~team-a.svc.cluster.local", Metadata: md}
}

// clusterWatch is an ADS stream that stays open, as a proxy's does: it
// acknowledges every CDS response and keeps the last one.
type clusterWatch struct {
	mu        sync.Mutex
	responses int
	names     []string
	err       error
}

// watchClusters opens a clusterWatch to a replica as the sidecar of
// team-a/web with w's certificate, and waits for its first response.
func watchClusters(t *testing.T, r *replica, w *workloadKey, clk *clocktesting.FakeClock) *clusterWatch {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(dial(t, r, w, clk)).StreamAggregatedResources(ctx)
	if err != nil {
		cancel()
		t.Fatalf("open an ADS stream: %v", err)
	}
	cw := &clusterWatch{}
	done := make(chan struct{})
	t.Cleanup(func() { cancel(); <-done })
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: adsNode(), TypeUrl: clusterType}); err != nil {
		t.Fatalf("ask for clusters: %v", err)
	}
	go func() {
		defer close(done)
		for {
			resp, err := stream.Recv()
			if err == nil {
				err = stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: clusterType,
					VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce})
			}
			cw.mu.Lock()
			if err != nil {
				cw.err = err
				cw.mu.Unlock()
				return
			}
			cw.responses++
			cw.names = cw.names[:0]
			for _, res := range resp.Resources {
				cw.names = append(cw.names, string(res.Value))
			}
			slices.Sort(cw.names)
			cw.mu.Unlock()
		}
	}()
	eventually(t, 20*time.Second, "the first response on a stream that stays open", func() error {
		if n, _, err := cw.last(); n == 0 {
			return fmt.Errorf("no response yet (%v)", err)
		}
		return nil
	})
	return cw
}

// last returns how many responses the stream has had, the resources of
// the last one, and the error that ended it, if one did.
func (cw *clusterWatch) last() (int, []string, error) {
	cw.mu.Lock()
	defer cw.mu.Unlock()
	return cw.responses, slices.Clone(cw.names), cw.err
}

// hasCluster reports whether one of the clusters names host.
func hasCluster(clusters []string, host string) bool {
	return slices.ContainsFunc(clusters, func(c string) bool { return strings.Contains(c, host) })
}

func leaders(rs ...*replica) int {
	n := 0
	for _, r := range rs {
		if r.cp.IsLeader() {
			n++
		}
	}
	return n
}

// TestKubeAPIServerStopped stops the kube-apiserver under two serving
// replicas and starts it again. While it is away: a first issuance by
// service-account token fails closed (Unavailable, the TokenReview named);
// renewal by certificate goes on against the service-account cache until
// the cache has been stale for --kube-stale-cache-limit, and is then
// refused as unavailable, saying since when; xDS serves the same
// resources; the leader stops leading within its renew deadline and CA
// rotation runs nowhere; everything else is served. Once it is back:
// exactly one Lease holder within 30 s, renewal works again, and a Service
// created after the return reaches xDS, on a stream held open through the
// outage and on new streams to both replicas.
func TestKubeAPIServerStopped(t *testing.T) {
	api := startAPIServer(t)
	ctx := context.Background()
	cs := kubernetes.NewForConfigOrDie(api.cfg)
	for _, ns := range []string{"trustmesh-system", "team-a"} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := cs.CoreV1().ServiceAccounts("team-a").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "web"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	// The sidecar that asks for configuration below runs in this pod.
	if _, err := cs.CoreV1().Pods("team-a").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{ServiceAccountName: "web", AutomountServiceAccountToken: new(bool),
			Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	service := func(name string) {
		t.Helper()
		if _, err := cs.CoreV1().Services("team-a").Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": name},
				Ports: []corev1.ServicePort{{Name: "http", Port: 8080, TargetPort: intstr.FromInt(8080)}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	service("web")
	// envtest runs no controllers, so the test writes the EndpointSlice
	// that the endpoint-slice controller would for a Service's pod: xDS
	// gives a sidecar a cluster only for a service with endpoints.
	backend := func(name, ip string) {
		t.Helper()
		if _, err := cs.CoreV1().ServiceAccounts("team-a").Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		pod := name + "-0"
		if _, err := cs.CoreV1().Pods("team-a").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: pod, Labels: map[string]string{"app": name}},
			Spec: corev1.PodSpec{ServiceAccountName: name, AutomountServiceAccountToken: new(bool),
				Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app"}}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		ready, port, portName := true, int32(8080), "http"
		if _, err := cs.DiscoveryV1().EndpointSlices("team-a").Create(ctx, &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: pod, Labels: map[string]string{discoveryv1.LabelServiceName: name}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{ip}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "team-a", Name: pod}}},
			Ports: []discoveryv1.EndpointPort{{Name: &portName, Port: &port}},
		}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		service(name)
	}
	token := func() string {
		t.Helper()
		exp := int64(3600)
		resp, err := cs.CoreV1().ServiceAccounts("team-a").CreateToken(ctx, "web", &authv1.TokenRequest{
			Spec: authv1.TokenRequestSpec{Audiences: []string{"istio-ca"}, ExpirationSeconds: &exp}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return resp.Status.Token
	}

	clk := clocktesting.NewFakeClock(time.Now().Truncate(time.Second))
	a := startReplica(t, api.cfg, clk)
	b := startReplica(t, api.cfg, clk)
	eventually(t, 30*time.Second, "one leader", func() error {
		if n := leaders(a, b); n != 1 {
			return fmt.Errorf("%d leaders", n)
		}
		return nil
	})

	web := newWorkloadKey(t)
	if err := issue(t, a, web, token(), clk); err != nil {
		t.Fatalf("first issuance with the apiserver up: %v", err)
	}
	// Each replica here keeps its own journal, and renewal looks the
	// certificate up in it: the workload of the other replica enrols there.
	webB := newWorkloadKey(t)
	if err := issue(t, b, webB, token(), clk); err != nil {
		t.Fatalf("first issuance on the other replica with the apiserver up: %v", err)
	}
	wantClusters, wantVersion, err := clusters(t, a, web, clk)
	if err != nil || len(wantClusters) == 0 {
		t.Fatalf("xDS clusters with the apiserver up: %d, %v", len(wantClusters), err)
	}
	unreviewed := token() // never shown to the CA yet: no review is cached
	// The sidecar keeps asking xDS with this certificate: the renewals below
	// are dated by the fake clock, which runs minutes ahead of the real one
	// that TLS checks validity with.
	webXDS := &workloadKey{key: web.key, chain: web.chain}
	// A proxy's stream, opened before the outage and held through it.
	held := watchClusters(t, a, webXDS, clk)
	if _, got, _ := held.last(); !slices.Equal(got, wantClusters) {
		t.Fatalf("a held stream's first response has %d clusters; want the %d a one-shot request got", len(got), len(wantClusters))
	}

	// The apiserver stops.
	api.stop(t)
	stoppedAt := clk.Now()

	err = issue(t, a, newWorkloadKey(t), unreviewed, clk)
	if status.Code(err) != codes.Unavailable || !strings.Contains(status.Convert(err).Message(), "TokenReview") {
		t.Fatalf("first issuance by token with the apiserver stopped = %v; want Unavailable naming the TokenReview", err)
	}
	if err := issue(t, a, web, "", clk); err != nil {
		t.Fatalf("renewal with the apiserver stopped, within the stale-cache limit: %v", err)
	}
	got, version, err := clusters(t, a, webXDS, clk)
	if err != nil || !slices.Equal(got, wantClusters) || version != wantVersion {
		t.Fatalf("xDS with the apiserver stopped: %d clusters at version %q, %v; want the same %d at %q",
			len(got), version, err, len(wantClusters), wantVersion)
	}

	// Leadership: the leader cannot renew its Lease, and stops leading;
	// rotation then runs nowhere, while both replicas go on serving.
	eventually(t, 20*time.Second, "the leader stops leading", func() error {
		if n := leaders(a, b); n != 0 {
			return fmt.Errorf("%d leaders with the apiserver stopped", n)
		}
		return nil
	})
	// Each rotation interval wakes every replica's rotation loop, which
	// reloads the CA from the Secret (and, the apiserver being away, logs
	// that it keeps the current one): the loop runs. A leader would also
	// take a rotation step, which fails against the stopped apiserver and
	// is logged: none is.
	const rotationFailed, reloadFailed = "CA rotation step failed", "could not reload the CA"
	before := a.log.count(rotationFailed) + b.log.count(rotationFailed)
	for i := range 3 {
		reloadsA, reloadsB := a.log.count(reloadFailed), b.log.count(reloadFailed)
		clk.Step(time.Minute) // rotation's interval
		eventually(t, 20*time.Second, fmt.Sprintf("rotation loops woken by interval %d", i+1), func() error {
			if a.log.count(reloadFailed) == reloadsA || b.log.count(reloadFailed) == reloadsB {
				return fmt.Errorf("a replica's rotation loop did not run")
			}
			return nil
		})
	}
	if after := a.log.count(rotationFailed) + b.log.count(rotationFailed); after != before {
		t.Fatalf("CA rotation ran %d times with no leader", after-before)
	}
	if err := issue(t, b, webB, "", clk); err != nil {
		t.Fatalf("renewal on the other replica, 3m into the outage: %v", err)
	}

	// Past the limit, renewal fails closed and says since when.
	clk.Step(staleLimit - 3*time.Minute + time.Second)
	staleLogged := a.log.count("the service-account cache is stale")
	err = issue(t, a, web, "", clk)
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("renewal %s into the outage = %v; want Unavailable, the cache stale", clk.Since(stoppedAt), err)
	}
	if a.log.count("the service-account cache is stale") == staleLogged {
		t.Fatalf("renewal %s into the outage was refused (%v), but the CA's log does not say the cache is stale", clk.Since(stoppedAt), err)
	}
	t.Logf("past the limit: %v", err)

	if n, _, err := held.last(); n != 1 || err != nil {
		t.Fatalf("the stream held through the outage: %d responses, ended by %v; want it open and sent nothing new", n, err)
	}

	// The apiserver is back.
	api.start(t)
	back := time.Now()
	eventually(t, 30*time.Second, "exactly one Lease holder", func() error {
		if n := leaders(a, b); n != 1 {
			return fmt.Errorf("%d leaders", n)
		}
		lease, err := cs.CoordinationV1().Leases("trustmesh-system").Get(ctx, "trustmesh-ca-rotation", metav1.GetOptions{})
		if err != nil {
			return err
		}
		if lease.Spec.HolderIdentity == nil || *lease.Spec.HolderIdentity == "" {
			return fmt.Errorf("the Lease has no holder")
		}
		return nil
	})
	t.Logf("one Lease holder %s after the apiserver's return", time.Since(back).Round(time.Millisecond))
	// The informers list and watch again after client-go's reflector
	// backoff, which grows to [30 s, 60 s) over a long outage.
	eventually(t, 60*time.Second, "renewal after the return", func() error { return issue(t, a, web, "", clk) })
	// That renewal needed the service-account informer to list and watch
	// again: past the limit, the stale cache alone refused it above.

	// A Service (with a pod and its endpoints) created after the return
	// reaches xDS: each replica's
	// informers list and watch again, its mesh feed publishes, and its xDS
	// server pushes, to the stream held through the outage and to new
	// ones. xDS debounces pushes on the control plane's clock, here the
	// fake one, which the test advances at about the real rate.
	backend("api", "10.0.0.6")
	const apiHost = "api.team-a.svc.cluster.local"
	created := time.Now()
	tick := func() {
		time.Sleep(xds.DefaultDebounce)
		clk.Step(xds.DefaultDebounce)
	}
	eventually(t, 60*time.Second, "the new Service on the stream held through the outage", func() error {
		tick()
		_, got, err := held.last()
		if err != nil {
			return fmt.Errorf("the held stream ended: %w", err)
		}
		if !hasCluster(got, apiHost) {
			return fmt.Errorf("no cluster for %s among %d", apiHost, len(got))
		}
		return nil
	})
	t.Logf("the new Service reached the held stream %s after it was created", time.Since(created).Round(time.Millisecond))
	for _, r := range []*replica{a, b} {
		eventually(t, 60*time.Second, "the new Service on a new stream to each replica", func() error {
			tick()
			got, _, err := clusters(t, r, webXDS, clk)
			if err != nil {
				return err
			}
			if !hasCluster(got, apiHost) {
				return fmt.Errorf("no cluster for %s among %d", apiHost, len(got))
			}
			return nil
		})
	}
	t.Logf("the new Service reached new streams to both replicas %s after it was created", time.Since(created).Round(time.Millisecond))
}
