package kube_test

import (
	"context"
	"testing"

	apinetworking "istio.io/api/networking/v1alpha3"
	networkingv1 "istio.io/client-go/pkg/apis/networking/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	discoveryv1 "k8s.io/api/discovery/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"
	"k8s.io/client-go/kubernetes"

	"github.com/trustmesh/trustmesh/mesh/kube"
	"github.com/trustmesh/trustmesh/mesh/meshtest"
)

// The contract runs in namespaces of its own, and compares the model only
// within them. (It runs after TestMeshFromKubernetes, which counts
// objects cluster-wide: Go runs test files in name order.)
func TestSourceKeepsTheContract(t *testing.T) {
	ctx := context.Background()
	cfg := apiserver(t)
	kc := must(kubernetes.NewForConfig(cfg))
	ic := must(istioclient.NewForConfig(cfg))
	namespace := func(prefix string) string {
		ns, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{GenerateName: prefix}}, metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		return ns.Name
	}
	n := meshtest.Names{App: namespace("shop-"), Gateway: namespace("gateways-")}

	// The contract's mesh as Kubernetes objects; see meshtest.Want.
	write := func(t *testing.T, v meshtest.Version, n meshtest.Names) {
		if v == meshtest.Relabelled {
			pod := must(kc.CoreV1().Pods(n.App).Get(ctx, "web-0", metav1.GetOptions{}))
			pod.Labels["version"] = "v2"
			must(kc.CoreV1().Pods(n.App).Update(ctx, pod, metav1.UpdateOptions{}))
			return
		}
		container := []corev1.Container{{Name: "app", Image: "app"}}
		must(kc.CoreV1().Pods(n.App).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "web-0", Labels: map[string]string{"app": "web"}},
			Spec:       corev1.PodSpec{ServiceAccountName: "web", Containers: container},
		}, metav1.CreateOptions{}))
		must(kc.CoreV1().Services(n.App).Create(ctx, &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: "web"},
			Spec: corev1.ServiceSpec{Selector: map[string]string{"app": "web"}, Ports: []corev1.ServicePort{
				{Name: "http", Port: 80, TargetPort: intstr.FromString("http")},
				{Name: "grpc-api", Port: 7070, TargetPort: intstr.FromInt32(7070)},
			}},
		}, metav1.CreateOptions{}))
		ready := true
		must(kc.DiscoveryV1().EndpointSlices(n.App).Create(ctx, &discoveryv1.EndpointSlice{
			ObjectMeta:  metav1.ObjectMeta{Name: "web-abc", Labels: map[string]string{discoveryv1.LabelServiceName: "web"}},
			AddressType: discoveryv1.AddressTypeIPv4,
			Ports:       []discoveryv1.EndpointPort{{Name: ptr("http"), Port: ptr(int32(8080))}, {Name: ptr("grpc-api"), Port: ptr(int32(7070))}},
			Endpoints: []discoveryv1.Endpoint{{Addresses: []string{"10.1.0.5"}, Conditions: discoveryv1.EndpointConditions{Ready: &ready},
				TargetRef: &corev1.ObjectReference{Kind: "Pod", Namespace: n.App, Name: "web-0"}}},
		}, metav1.CreateOptions{}))
		must(kc.CoreV1().Pods(n.Gateway).Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: "ingress-0", Labels: map[string]string{"istio": "ingressgateway"}},
			Spec:       corev1.PodSpec{ServiceAccountName: "ingress", Containers: container},
		}, metav1.CreateOptions{}))
		must(kc.CoreV1().Secrets(n.Gateway).Create(ctx, &corev1.Secret{
			ObjectMeta: metav1.ObjectMeta{Name: "shop-cert"}, Type: corev1.SecretTypeTLS,
			Data: map[string][]byte{corev1.TLSCertKey: []byte("CERT"), corev1.TLSPrivateKeyKey: []byte("KEY")},
		}, metav1.CreateOptions{}))
		must(ic.NetworkingV1().Gateways(n.Gateway).Create(ctx, &networkingv1.Gateway{
			ObjectMeta: metav1.ObjectMeta{Name: "ingress"},
			Spec: apinetworking.Gateway{Selector: map[string]string{"istio": "ingressgateway"}, Servers: []*apinetworking.Server{{
				Port: &apinetworking.Port{Number: 8443, Name: "https", Protocol: "HTTPS"}, Hosts: []string{n.App + ".example.com"},
				Tls: &apinetworking.ServerTLSSettings{Mode: apinetworking.ServerTLSSettings_SIMPLE, CredentialName: "shop-cert"},
			}}},
		}, metav1.CreateOptions{}))
		must(ic.NetworkingV1().VirtualServices(n.App).Create(ctx, &networkingv1.VirtualService{
			ObjectMeta: metav1.ObjectMeta{Name: "shop"},
			Spec: apinetworking.VirtualService{Hosts: []string{n.App + ".example.com"}, Gateways: []string{n.Gateway + "/ingress"},
				Http: []*apinetworking.HTTPRoute{{Route: []*apinetworking.HTTPRouteDestination{{
					Destination: &apinetworking.Destination{Host: "web", Port: &apinetworking.PortSelector{Number: 80}}}}}}},
		}, metav1.CreateOptions{}))
		must(ic.NetworkingV1().ServiceEntries(n.App).Create(ctx, &networkingv1.ServiceEntry{
			ObjectMeta: metav1.ObjectMeta{Name: "payments"},
			Spec: apinetworking.ServiceEntry{Hosts: []string{"api." + n.App + ".example"}, Location: apinetworking.ServiceEntry_MESH_EXTERNAL,
				Resolution: apinetworking.ServiceEntry_DNS, Ports: []*apinetworking.ServicePort{{Number: 80, Name: "http", Protocol: "HTTP", TargetPort: 443}}},
		}, metav1.CreateOptions{}))
	}
	meshtest.Run(t, &kube.Source{Client: kc, Istio: ic, TrustDomain: meshtest.TrustDomain}, n, write)
}
