package ambient

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	authnv1 "k8s.io/api/authentication/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// TestNodeAgentOnKubernetes runs a node on a real kube-apiserver: serve
// with Kubernetes on and the node agent's account trusted for delegation;
// `trustmesh node` authenticated by its own pod-bound token (whose node
// claim says node-a); and processes in pods' cgroups (the kubelet's
// cgroupfs layout, kubepods/besteffort/pod<UID>/<container>), each in its
// own network namespace and under its own user. A process in the cgroup of
// a pod on node-a gets exactly that pod's identity; one in the cgroup of a
// pod on node-b, or of no pod, gets PermissionDenied.
func TestNodeAgentOnKubernetes(t *testing.T) {
	needRoot(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	env, cfg, err := kubeapi.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	crds, err := kubeapi.IstioCRDs()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := envtest.InstallCRDs(cfg, envtest.CRDInstallOptions{ErrorIfPathMissing: true, Paths: crds}); err != nil {
		t.Fatal(err)
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, n := range []string{"node-a", "node-b"} {
		if _, err := cs.CoreV1().Nodes().Create(ctx, &corev1.Node{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	for _, ns := range []string{"demo", "trustmesh-system"} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	account := func(ns, name string) {
		if _, err := cs.CoreV1().ServiceAccounts(ns).Create(ctx, &corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: name}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	mkPod := func(ns, name, sa, node string) *corev1.Pod {
		p, err := cs.CoreV1().Pods(ns).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec: corev1.PodSpec{ServiceAccountName: sa, NodeName: node, AutomountServiceAccountToken: new(bool),
				Containers: []corev1.Container{{Name: "app", Image: "registry.invalid/app"}}},
		}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, a := range []string{"web", "db", "billing"} {
		account("demo", a)
	}
	account("trustmesh-system", "node-agent")
	webPod := mkPod("demo", "web-0", "web", "node-a")
	dbPod := mkPod("demo", "db-0", "db", "node-a")
	billingPod := mkPod("demo", "billing-0", "billing", "node-b")
	agentPod := mkPod("trustmesh-system", "node-agent-a", "node-agent", "node-a")

	dir := shortDir(t)
	kubeconfig := filepath.Join(dir, "kubeconfig")
	kc := clientcmdapi.NewConfig()
	kc.Clusters["envtest"] = &clientcmdapi.Cluster{Server: cfg.Host, CertificateAuthorityData: cfg.CAData}
	kc.AuthInfos["admin"] = &clientcmdapi.AuthInfo{ClientCertificateData: cfg.CertData, ClientKeyData: cfg.KeyData, Token: cfg.BearerToken}
	kc.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "admin"}
	kc.CurrentContext = "envtest"
	if err := clientcmd.WriteToFile(*kc, kubeconfig); err != nil {
		t.Fatal(err)
	}
	// The node agent's own token, bound to its pod on node-a, for the CA's
	// audience: what the chart's projected volume gives it.
	exp := int64(3600)
	tr, err := cs.CoreV1().ServiceAccounts("trustmesh-system").CreateToken(ctx, "node-agent", &authnv1.TokenRequest{Spec: authnv1.TokenRequestSpec{
		Audiences: []string{"istio-ca"}, ExpirationSeconds: &exp,
		BoundObjectRef: &authnv1.BoundObjectReference{Kind: "Pod", APIVersion: "v1", Name: agentPod.Name, UID: agentPod.UID},
	}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	tokenFile := filepath.Join(dir, "token")
	if err := os.WriteFile(tokenFile, []byte(tr.Status.Token), 0o600); err != nil {
		t.Fatal(err)
	}

	s := startServeKube(t, kubeconfig, "--trusted-node-accounts", "trustmesh-system/node-agent")
	// The pods' cgroups are under a kubelet cgroup root of this test's own
	// (as a kind node's kubelet has /kubelet), which the node agent is told.
	kubeletRoot := fmt.Sprintf("%d-kubelet", os.Getpid())
	node := &nodeAgent{name: "node-a", socket: filepath.Join(dir, "node.sock")}
	node.monitoring = freeport.Addr(t)
	node.proc = startProc(t, "trustmesh node node-a", nil, "node", "--node-name", "node-a",
		"--ca-address", s.ca, "--ca-bundle-file", s.bundleFile, "--token-file", tokenFile,
		"--socket", node.socket, "--monitoring-address", node.monitoring, "--pending-wait", "2s",
		"--kubelet-cgroup-root", "/trustmesh-ambient-test/"+kubeletRoot)

	inPodUnder := func(parent, name string, p *corev1.Pod, uid int) *pod {
		cid := make([]byte, 32)
		_, _ = rand.Read(cid)
		rel := filepath.Join(parent, "kubepods", "besteffort", "pod"+string(p.UID), hex.EncodeToString(cid))
		return newPodIn(t, name, uid, uid, rel)
	}
	inPod := func(name string, p *corev1.Pod, uid int) *pod { return inPodUnder(kubeletRoot, name, p, uid) }
	web := inPod("k-web", webPod, 1001)
	db := inPod("k-db", dbPod, 1002)
	billing := inPod("k-billing", billingPod, 1004)
	stranger := newPod(t, "k-stranger", 1009, 1009)
	// A process that names web's pod cgroup inside a subtree of its own (as
	// a systemd user manager's delegated one) is no pod (review15-sec F1).
	impostor := inPodUnder(fmt.Sprintf("%d-user@1010.service", os.Getpid()), "k-impostor", webPod, 1010)

	started := time.Now()
	took := waitAll(t, node, map[*pod][]string{web: {sa("web")}, db: {sa("db")}}, restartBound)
	t.Logf("node agent on Kubernetes: every pod served in %s (%s)", time.Since(started).Round(time.Millisecond), took)
	for _, p := range []*pod{billing, stranger, impostor} {
		r, err := p.fetch(ctx, node.socket)
		if err != nil {
			t.Fatal(err)
		}
		if r.Code != codes.PermissionDenied.String() || len(r.IDs) != 0 {
			t.Errorf("process %s got %v, code %q (%s); want PermissionDenied and no SVID", p.name, r.IDs, r.Code, r.Error)
		}
	}
	holdings := auditNodes(t, s)
	if got := holdings["node-a"]; !slices.Contains(got, sa("web")) || !slices.Contains(got, sa("db")) || slices.Contains(got, sa("billing")) {
		t.Errorf("audit nodes: node-a holds %v; want web and db, not billing", got)
	}
}

// startServeKube runs `trustmesh serve` against the kube-apiserver that
// kubeconfig names, with no mesh files.
func startServeKube(t *testing.T, kubeconfig string, extra ...string) *server {
	t.Helper()
	return startServe(t, nil, append([]string{"--kubernetes", "on", "--kubeconfig", kubeconfig,
		"--listen-injector", "off", "--validation-webhook-config", "off"}, extra...)...)
}
