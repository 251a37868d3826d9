package main

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// TestAnalyzeClusterControlPlaneSettings holds analyze on a cluster to the
// root namespace and trust domain of the control plane running there, as
// the chart installs it (--root-namespace is the release namespace), not
// to istio-system and cluster.local: a mesh-wide policy in the release
// namespace is then no local policy of a namespace without workloads
// (TMA001), and its principal of the mesh's trust domain no foreign one
// (TMA003). The control plane is the Deployment behind a webhook
// configuration's Service, so a tenant's trustmesh serve elsewhere (a
// decoy) changes nothing. A note says where the settings came from; flags
// win; without a control plane, or with control planes that disagree, the
// defaults, with a note that says why.
func TestAnalyzeClusterControlPlaneSettings(t *testing.T) {
	env, restConfig, err := kubeapi.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	crds, err := kubeapi.IstioCRDs()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := envtest.InstallCRDs(restConfig, envtest.CRDInstallOptions{Paths: crds, ErrorIfPathMissing: true}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kc, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		t.Fatal(err)
	}
	ic, err := istioclient.NewForConfig(restConfig)
	if err != nil {
		t.Fatal(err)
	}
	for _, ns := range []string{"shop", "trustmesh", "other"} {
		if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "orders-0", Namespace: "shop", Labels: map[string]string{"app": "orders"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "orders", Containers: []corev1.Container{{Name: "app", Image: "orders"}}},
	}
	if _, err := kc.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	var ap securityv1.AuthorizationPolicy
	if err := yaml.UnmarshalStrict([]byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: mesh-allow-orders, namespace: trustmesh}
spec:
  selector:
    matchLabels: {app: orders}
  rules: [{from: [{source: {principals: ["prod.example.com/ns/shop/sa/orders"]}}]}]
`), &ap); err != nil {
		t.Fatal(err)
	}
	if _, err := ic.SecurityV1().AuthorizationPolicies("trustmesh").Create(ctx, &ap, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	kubeconfig := writeKubeconfig(t, restConfig)
	deploy := func(ns, name string, container corev1.Container) {
		t.Helper()
		labels := map[string]string{"app": name}
		d := &appsv1.Deployment{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec: appsv1.DeploymentSpec{
				Selector: &metav1.LabelSelector{MatchLabels: labels},
				Template: corev1.PodTemplateSpec{
					ObjectMeta: metav1.ObjectMeta{Labels: labels},
					Spec:       corev1.PodSpec{Containers: []corev1.Container{container}},
				},
			},
		}
		if _, err := kc.AppsV1().Deployments(ns).Create(ctx, d, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	// behindWebhook makes a Service that selects the Deployment ns/name's
	// pods and a webhook configuration (Validating, or Mutating when
	// mutating) that calls it: what a cluster admin installs, and a tenant
	// cannot.
	behindWebhook := func(ns, name string, mutating bool) {
		t.Helper()
		svc := &corev1.Service{
			ObjectMeta: metav1.ObjectMeta{Name: name, Namespace: ns},
			Spec:       corev1.ServiceSpec{Selector: map[string]string{"app": name}, Ports: []corev1.ServicePort{{Port: 443}}},
		}
		if _, err := kc.CoreV1().Services(ns).Create(ctx, svc, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		none := admissionregistrationv1.SideEffectClassNone
		ref := &admissionregistrationv1.ServiceReference{Namespace: ns, Name: name}
		if mutating {
			_, err = kc.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, &admissionregistrationv1.MutatingWebhookConfiguration{
				ObjectMeta: metav1.ObjectMeta{Name: ns + "-" + name},
				Webhooks: []admissionregistrationv1.MutatingWebhook{{Name: "inject.trustmesh.io", ClientConfig: admissionregistrationv1.WebhookClientConfig{Service: ref},
					SideEffects: &none, AdmissionReviewVersions: []string{"v1"}}},
			}, metav1.CreateOptions{})
		} else {
			_, err = kc.AdmissionregistrationV1().ValidatingWebhookConfigurations().Create(ctx, &admissionregistrationv1.ValidatingWebhookConfiguration{
				ObjectMeta: metav1.ObjectMeta{Name: ns + "-" + name},
				Webhooks: []admissionregistrationv1.ValidatingWebhook{{Name: "validation.trustmesh.io", ClientConfig: admissionregistrationv1.WebhookClientConfig{Service: ref},
					SideEffects: &none, AdmissionReviewVersions: []string{"v1"}}},
			}, metav1.CreateOptions{})
		}
		if err != nil {
			t.Fatal(err)
		}
	}
	check := func(name string, args []string, want []string, note string) {
		t.Helper()
		stdout, stderr, code := runAnalyze(t, append([]string{"--kubeconfig", kubeconfig, "-o", "json", "--fail-on", "none"}, args...)...)
		if code != 0 {
			t.Fatalf("%s: exit %d\n%s", name, code, stderr)
		}
		rep := analyzeReport(t, stdout)
		if got := codesOf(rep); !slices.Equal(got, want) {
			t.Errorf("%s: findings %q, want %q", name, got, want)
		}
		if !slices.ContainsFunc(rep.Notes, func(n string) bool { return strings.Contains(n, note) }) {
			t.Errorf("%s: notes %q, want one saying %q", name, rep.Notes, note)
		}
	}
	judgedLocal := []string{"TMA001 AuthorizationPolicy trustmesh/mesh-allow-orders", "TMA003 AuthorizationPolicy trustmesh/mesh-allow-orders"}

	// Not a control plane: another program's serve, trustmesh with
	// Kubernetes off, and a tenant's trustmesh serve that no webhook
	// configuration calls (a decoy).
	deploy("other", "web", corev1.Container{Name: "web", Image: "example/web", Args: []string{"serve", "--root-namespace=other"}})
	behindWebhook("other", "web", false)
	deploy("other", "offline", corev1.Container{Name: "tm", Image: "example/tools", Command: []string{"/usr/bin/trustmesh"},
		Args: []string{"serve", "--kubernetes", "off", "--root-namespace", "other"}})
	behindWebhook("other", "offline", false)
	deploy("other", "decoy", corev1.Container{Name: "trustmesh", Image: "ghcr.io/trustmesh/trustmesh:dev",
		Args: []string{"serve", "--trust-domain=evil.example.com", "--root-namespace=other"}})
	check("no control plane", nil, judgedLocal,
		"root namespace istio-system (the default; no trustmesh control plane (a Deployment running trustmesh serve behind a webhook configuration's Service) is in the cluster), "+
			"trust domain cluster.local (the default; no trustmesh control plane")

	// The chart's control plane, behind its ValidatingWebhookConfiguration:
	// its flags, and the decoy's nowhere.
	deploy("trustmesh", "trustmesh", corev1.Container{Name: "trustmesh", Image: "ghcr.io/trustmesh/trustmesh:dev",
		Args: []string{"serve", "--kubernetes=on", "--trust-domain=prod.example.com", "--root-namespace=trustmesh", "--log-format=json"}})
	behindWebhook("trustmesh", "trustmesh", false)
	check("the chart's control plane", nil, nil,
		"root namespace trustmesh (the control plane's flags: Deployment trustmesh/trustmesh), trust domain prod.example.com (the control plane's flags: Deployment trustmesh/trustmesh)")
	// Flags win, and say so.
	check("--root-namespace", []string{"--root-namespace", "istio-system"}, judgedLocal[:1],
		"root namespace istio-system (--root-namespace), trust domain prod.example.com (the control plane's flags: Deployment trustmesh/trustmesh)")

	// Two control planes that disagree on the root namespace: its
	// default, and why; the trust domain they agree on.
	deploy("other", "trustmesh", corev1.Container{Name: "trustmesh", Image: "ghcr.io/trustmesh/trustmesh:dev",
		Args: []string{"serve", "--trust-domain=prod.example.com"}})
	behindWebhook("other", "trustmesh", true)
	check("control planes that disagree", nil, judgedLocal[:1],
		"root namespace istio-system (the default; the control planes disagree: Deployment other/trustmesh has istio-system, Deployment trustmesh/trustmesh has trustmesh), "+
			"trust domain prod.example.com (the control plane's flags: Deployment other/trustmesh, Deployment trustmesh/trustmesh); pass --root-namespace if the control plane's differ")
	check("control planes that disagree, the flag given", []string{"--root-namespace", "trustmesh"}, nil,
		"root namespace trustmesh (--root-namespace), trust domain prod.example.com (the control plane's flags: Deployment other/trustmesh, Deployment trustmesh/trustmesh)")
}
