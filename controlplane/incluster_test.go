package controlplane_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"
	apisecurity "istio.io/api/security/v1beta1"
	apitype "istio.io/api/type/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/freeport"
)

// TestControlPlaneInCluster runs the control plane against a real
// kube-apiserver with Istio's CRDs, as it runs in a cluster: it watches
// AuthorizationPolicies and Services, issues a certificate to a service
// account's token, and serves xDS to the proxy of a pod it has seen.
func TestControlPlaneInCluster(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := envtest.InstallCRDs(cfg, envtest.CRDInstallOptions{ErrorIfPathMissing: true,
		Paths: []string{filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")}}); err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"store", "istio-system"} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	cl := &cluster{t: t, cs: cs, ns: "store"}
	cl.serviceAccount("web")
	pod, err := cs.CoreV1().Pods("store").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Labels: map[string]string{"app": "web"}},
		Spec: corev1.PodSpec{ServiceAccountName: "web", AutomountServiceAccountToken: new(bool),
			Containers: []corev1.Container{{Name: "web", Image: "registry.invalid/web"}}},
	}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.CoreV1().Services("store").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"},
			Ports: []corev1.ServicePort{{Name: "http", Port: 80, TargetPort: intstr.FromInt32(8080)}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ready, name, port := true, "http", int32(8080)
	if _, err := cs.DiscoveryV1().EndpointSlices("store").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-x", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: &name, Port: &port}},
		Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.2.0.7"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
			TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "store", Name: "web-0"}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ic := istioclient.NewForConfigOrDie(cfg)
	if _, err := ic.SecurityV1().AuthorizationPolicies("store").Create(ctx, &securityv1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "deny-admin"},
		Spec: apisecurity.AuthorizationPolicy{Selector: &apitype.WorkloadSelector{MatchLabels: map[string]string{"app": "web"}},
			Action: apisecurity.AuthorizationPolicy_DENY,
			Rules:  []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Paths: []string{"/admin*"}}}}}}},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}

	authzAddr := freeport.Addr(t)
	// Every component reaches the API server through the clients the
	// control plane builds once per start: one transport, however many
	// components (CA Secret, checkpoint key, leader election, token
	// reviews, mesh, policies, injector) use it.
	var transports atomic.Int32
	cpCfg := rest.CopyConfig(cfg)
	cpCfg.WrapTransport = func(rt http.RoundTripper) http.RoundTripper { transports.Add(1); return rt }
	e := start(t, func(c *controlplane.Config) {
		c.Kubernetes.RestConfig = cpCfg
		c.Kubernetes.Mode = controlplane.KubernetesOn
		c.CA.Secret = "store/trustmesh-ca"
		c.Listen.Authz = authzAddr
		c.Authz.DecisionLog = os.Stderr
	})
	defer func() {
		if n := transports.Load(); n != 1 {
			t.Errorf("one start built %d transports to the API server, want 1", n)
		}
	}()

	// A certificate for the pod's service account, from its token.
	webID := spiffeid.RequireFromString("spiffe://cluster.local/ns/store/sa/web")
	web := &workload{id: webID, c: newClient(t)}
	e.obtain(web.c, cl.token("web", "istio-ca", pod), webID)
	web.setCert()
	tlsCfg := &tls.Config{RootCAs: rootPool(e), ServerName: "localhost", Time: e.clock.Now, Certificates: []tls.Certificate{*web.cert.Load()}}

	// xDS for the pod, once the control plane has seen it.
	conn, err := grpc.NewClient(e.cp.Addrs().CA.String(), grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(sctx)
	if err != nil {
		t.Fatal(err)
	}
	md, _ := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": "web", "NAMESPACE": "store"})
	node := &corev3.Node{Id: "sidecar~10.2.0.7~web-0.store~store.svc.cluster.local", Metadata: md}
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: "type.googleapis.com/envoy.config.cluster.v3.Cluster"}); err != nil {
		t.Fatal(err)
	}
	var clusters []string
	for sctx.Err() == nil {
		resp, err := stream.Recv()
		if err != nil {
			t.Fatalf("xDS for a pod the control plane has seen: %v", err)
		}
		clusters = clusters[:0]
		for _, r := range resp.Resources {
			clusters = append(clusters, string(r.Value))
		}
		if strings.Contains(strings.Join(clusters, " "), "web.store.svc.cluster.local") {
			break
		}
		if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: resp.TypeUrl, VersionInfo: resp.VersionInfo, ResponseNonce: resp.Nonce}); err != nil {
			t.Fatal(err)
		}
	}
	if sctx.Err() != nil {
		t.Fatal("the pod's proxy never got a cluster for the web service")
	}

	// The AuthorizationPolicy from the API server is enforced.
	aconn, err := grpc.NewClient(authzAddr, grpc.WithTransportCredentials(credentials.NewTLS(tlsCfg)))
	if err != nil {
		t.Fatal(err)
	}
	defer aconn.Close()
	check := func(path string) codes.Code {
		t.Helper()
		resp, err := authv3.NewAuthorizationClient(aconn).Check(sctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Source:      &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/store/sa/client"},
			Destination: &authv3.AttributeContext_Peer{Principal: webID.String(), Labels: map[string]string{"app": "web"}},
			Request:     &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: path, Host: "web"}},
		}}, grpc.WaitForReady(true))
		if err != nil {
			t.Fatal(err)
		}
		return codes.Code(resp.GetStatus().GetCode())
	}
	if got := check("/admin/users"); got != codes.PermissionDenied {
		t.Fatalf("GET /admin/users = %v, want PermissionDenied from the cluster's policy", got)
	}
	if got := check("/catalog"); got != codes.OK {
		t.Fatalf("GET /catalog = %v, want OK", got)
	}
}
