package kube_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	apinetworking "istio.io/api/networking/v1alpha3"
	apisecurity "istio.io/api/security/v1beta1"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/mesh/kube"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

var shared = kubeapi.Shared{CRDs: kubeapi.IstioCRDs}

// TestMain stops the shared kube-apiserver and fails a passing run that
// leaves the source's goroutines running.
func TestMain(m *testing.M) { shared.Main(m) }

// apiserver starts the shared apiserver and installs Istio's CRDs from the
// istio.io/api module.
func apiserver(t *testing.T) *rest.Config {
	t.Helper()
	return shared.Config(t)
}

func must[T any](v T, err error) T {
	if err != nil {
		panic(err)
	}
	return v
}

// TestMeshFromKubernetes builds the model from real objects: a Service
// with its EndpointSlice and Pod, an external ServiceEntry, an ingress
// Gateway with a VirtualService and its TLS Secret, and a PERMISSIVE
// PeerAuthentication that must be refused. A change to a pod's labels
// reaches the model.
func TestMeshFromKubernetes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	restConfig := apiserver(t)
	kc := must(kubernetes.NewForConfig(restConfig))
	ic := must(istioclient.NewForConfig(restConfig))
	for _, ns := range []string{"shop", "istio-system"} {
		must(kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}))
	}
	must(kc.CoreV1().Pods("shop").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "web-0", Labels: map[string]string{"app": "web"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "web", Containers: []corev1.Container{{Name: "web", Image: "web"}}},
	}, metav1.CreateOptions{}))
	must(kc.CoreV1().Services("shop").Create(ctx, &corev1.Service{
		ObjectMeta: metav1.ObjectMeta{Name: "web"},
		Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
			{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
			{Name: "grpc-api", Port: 7070, TargetPort: intstr.FromInt32(7070)},
		}},
	}, metav1.CreateOptions{}))
	// The gateway's pod serves no Service and is not ready: the mesh still
	// knows it (its proxy asks for configuration before it is ready).
	must(kc.CoreV1().Pods("istio-system").Create(ctx, &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "ingress-0", Labels: map[string]string{"istio": "ingressgateway"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "ingress", Containers: []corev1.Container{{Name: "proxy", Image: "proxy"}}},
	}, metav1.CreateOptions{}))
	ready := true
	must(kc.DiscoveryV1().EndpointSlices("shop").Create(ctx, &discoveryv1.EndpointSlice{
		ObjectMeta:  metav1.ObjectMeta{Name: "web-abc", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
		AddressType: discoveryv1.AddressTypeIPv4,
		Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}, {Name: ptr("grpc-api"), Port: ptr(int32(7070))}},
		Endpoints: []discoveryv1.Endpoint{
			{Addresses: []string{"10.1.0.5"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: "shop", Name: "web-0"}},
			{Addresses: []string{"10.1.0.6"}}, // no pod, no identity
		},
	}, metav1.CreateOptions{}))
	must(ic.NetworkingV1().ServiceEntries("shop").Create(ctx, &networkingv1.ServiceEntry{
		ObjectMeta: metav1.ObjectMeta{Name: "payments"},
		Spec: apinetworking.ServiceEntry{Hosts: []string{"api.payments.example"}, Location: apinetworking.ServiceEntry_MESH_EXTERNAL,
			Resolution: apinetworking.ServiceEntry_DNS, Ports: []*apinetworking.ServicePort{{Number: 80, Name: "http", Protocol: "HTTP", TargetPort: 443}}},
	}, metav1.CreateOptions{}))
	must(kc.CoreV1().Secrets("istio-system").Create(ctx, &corev1.Secret{
		ObjectMeta: metav1.ObjectMeta{Name: "shop-cert"}, Type: corev1.SecretTypeTLS,
		Data: map[string][]byte{corev1.TLSCertKey: []byte("CERT"), corev1.TLSPrivateKeyKey: []byte("KEY")},
	}, metav1.CreateOptions{}))
	must(ic.NetworkingV1().Gateways("istio-system").Create(ctx, &networkingv1.Gateway{
		ObjectMeta: metav1.ObjectMeta{Name: "ingress"},
		Spec: apinetworking.Gateway{Selector: map[string]string{"istio": "ingressgateway"}, Servers: []*apinetworking.Server{{
			Port: &apinetworking.Port{Number: 8443, Name: "https", Protocol: "HTTPS"}, Hosts: []string{"shop.example.com"},
			Tls: &apinetworking.ServerTLSSettings{Mode: apinetworking.ServerTLSSettings_SIMPLE, CredentialName: "shop-cert"},
		}}},
	}, metav1.CreateOptions{}))
	must(ic.NetworkingV1().VirtualServices("shop").Create(ctx, &networkingv1.VirtualService{
		ObjectMeta: metav1.ObjectMeta{Name: "shop"},
		Spec: apinetworking.VirtualService{Hosts: []string{"shop.example.com"}, Gateways: []string{"istio-system/ingress"},
			Http: []*apinetworking.HTTPRoute{{Route: []*apinetworking.HTTPRouteDestination{{
				Destination: &apinetworking.Destination{Host: "web", Port: &apinetworking.PortSelector{Number: 80}}}}}}},
	}, metav1.CreateOptions{}))
	must(ic.SecurityV1().PeerAuthentications("shop").Create(ctx, &securityv1.PeerAuthentication{
		ObjectMeta: metav1.ObjectMeta{Name: "lax"},
		Spec:       apisecurity.PeerAuthentication{Mtls: &apisecurity.PeerAuthentication_MutualTLS{Mode: apisecurity.PeerAuthentication_MutualTLS_PERMISSIVE}},
	}, metav1.CreateOptions{}))

	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	src := &kube.Source{Client: kc, Istio: ic, TrustDomain: td}
	if _, err := src.Mesh(); err == nil {
		t.Fatal("Mesh() before Watch succeeded")
	}
	changes := make(chan struct{}, 1)
	wctx, wcancel := context.WithCancel(ctx)
	done, err := src.Watch(wctx, func() {
		select {
		case changes <- struct{}{}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		wcancel()
		if err := <-done; err != nil {
			t.Errorf("watch ended with %v", err)
		}
	}()
	m, err := src.Mesh()
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Validate(td); err != nil {
		t.Fatal(err)
	}
	web := m.Service("shop/web")
	if web == nil || web.Hostname != "web.shop.svc.cluster.local" || len(web.Endpoints) != 1 {
		t.Fatalf("service shop/web = %+v", web)
	}
	ep := web.Endpoints[0]
	if ep.Address != "10.1.0.5" || ep.Workload.ID.String() != "spiffe://cluster.local/ns/shop/sa/web" || ep.Workload.Labels["app"] != "web" {
		t.Fatalf("endpoint = %+v, workload %+v", ep, ep.Workload)
	}
	if ep.TargetPort(web.Ports[0]) != 8080 || web.Ports[0].Protocol != mesh.HTTP || web.Ports[1].Protocol != mesh.GRPC {
		t.Fatalf("ports = %+v, endpoint ports %v", web.Ports, ep.Ports)
	}
	if len(m.External) != 1 || m.External[0].Host != "api.payments.example" || m.External[0].Ports[0].Target() != 443 {
		t.Fatalf("external = %+v", m.External)
	}
	if len(m.Gateways) != 1 || len(m.Gateways[0].Servers) != 1 || len(m.Gateways[0].Servers[0].Routes) != 1 ||
		m.Gateways[0].Servers[0].Routes[0].Service != "shop/web" {
		t.Fatalf("gateways = %+v", m.Gateways)
	}
	if s := m.Secret("istio-system", "shop-cert"); s == nil || string(s.KeyPEM) != "KEY" {
		t.Fatal("the gateway's TLS secret is missing")
	}
	if w := m.Workload("istio-system", "ingress-0"); w == nil || w.ServiceAccount != "ingress" || w.Labels["istio"] != "ingressgateway" {
		t.Fatalf("the gateway's pod, which serves no service, is not a workload of the mesh: %+v", w)
	}
	if !m.MayReadSecret("istio-system", "ingress", "shop-cert") || m.MayReadSecret("istio-system", "default", "shop-cert") {
		t.Fatal("the gateway's secret is not limited to the gateway's service account")
	}
	if len(m.Refusals) != 1 || !strings.Contains(m.Refusals[0].Reason, "PERMISSIVE") {
		t.Fatalf("refusals = %v", m.Refusals)
	}

	// A label change reaches the model.
	drain(changes)
	pod := must(kc.CoreV1().Pods("shop").Get(ctx, "web-0", metav1.GetOptions{}))
	pod.Labels["version"] = "v2"
	must(kc.CoreV1().Pods("shop").Update(ctx, pod, metav1.UpdateOptions{}))
	select {
	case <-changes:
	case <-ctx.Done():
		t.Fatal("no change reported")
	}
	for {
		m, err := src.Mesh()
		if err != nil {
			t.Fatal(err)
		}
		if m.Service("shop/web").Endpoints[0].Workload.Labels["version"] == "v2" {
			break
		}
		select {
		case <-changes:
		case <-ctx.Done():
			t.Fatal("the label change never reached the model")
		}
	}
}

func drain(c chan struct{}) {
	for {
		select {
		case <-c:
		default:
			return
		}
	}
}

func ptr[T any](v T) *T { return &v }
