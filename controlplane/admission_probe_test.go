package controlplane_test

import (
	"context"
	"crypto/tls"
	"net/http"
	"strings"
	"testing"
	"time"

	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trustmesh/trustmesh/controlplane"
)

// With KeepIgnore (serve --validation-fail-closed=false, the chart's
// single replica) the webhook is served and its caBundle kept, so that it
// refuses what the engine refuses, but its failurePolicy stays Ignore: a
// lone replica that is down must not block every write of the kinds it
// checks.
func TestServeKeepsIgnoreWhenNotFailClosed(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	installIstioCRDs(t, cfg)
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "keepignore"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	const name = "trustmesh-validator-keepignore"
	e := start(t, func(c *controlplane.Config) {
		c.Kubernetes.RestConfig = cfg
		c.Kubernetes.Mode = controlplane.KubernetesOn
		c.Authz.RootNamespace = "keepignore"
		c.Admission.WebhookConfig = name
		c.Admission.KeepIgnore = true
	})
	api := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	if _, err := api.Create(ctx, validatingWebhook(name, e.cp.Addrs().Injector.String()), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.Delete(context.Background(), name, metav1.DeleteOptions{}) })
	// The webhook answers: a policy the engine refuses is refused.
	ic := istioclient.NewForConfigOrDie(cfg)
	bad := &securityv1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Name: "bad"},
		Spec: apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_DENY, Rules: []*apisecurity.Rule{{
			From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Principals: []string{"cluster.local/ns/a*b/sa/x"}}}},
		}}},
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		_, err := ic.SecurityV1().AuthorizationPolicies("keepignore").Create(ctx, bad, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
		if err != nil && strings.Contains(err.Error(), `admission webhook "validation.trustmesh.io" denied the request`) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the webhook never refused a policy the engine refuses: %v", err)
		}
		time.Sleep(200 * time.Millisecond)
	}
	// Time for a probe and a switch, which a fail-closed serve makes
	// within a second of the caBundle.
	time.Sleep(5 * time.Second)
	vwc, err := api.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h := vwc.Webhooks[0]
	if len(h.ClientConfig.CABundle) == 0 {
		t.Error("the caBundle was not published")
	}
	if *h.FailurePolicy != admissionregistrationv1.Ignore {
		t.Errorf("failurePolicy %s with KeepIgnore, want Ignore", *h.FailurePolicy)
	}
}

// With --validation-webhook-config=off (the chart's validation.enabled
// false) serve keeps no ValidatingWebhookConfiguration, not even one named
// "off" (it needs no RBAC for any), and still serves /validate.
func TestServeKeepsNoValidatingWebhookWhenOff(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	installIstioCRDs(t, cfg)
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "validationoff"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	e := start(t, func(c *controlplane.Config) {
		c.Kubernetes.RestConfig = cfg
		c.Kubernetes.Mode = controlplane.KubernetesOn
		c.Authz.RootNamespace = "validationoff"
		c.Admission.WebhookConfig = controlplane.ValidationWebhookOff
	})
	addr := e.cp.Addrs().Injector.String()
	api := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	if _, err := api.Create(ctx, validatingWebhook(controlplane.ValidationWebhookOff, addr), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = api.Delete(context.Background(), controlplane.ValidationWebhookOff, metav1.DeleteOptions{})
	})
	// /validate answers (a review without a request is refused as such).
	hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: rootPool(e), ServerName: "127.0.0.1"}}}
	defer hc.CloseIdleConnections()
	resp, err := hc.Post("https://"+addr+"/validate", "application/json", strings.NewReader("{}"))
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest {
		t.Errorf("POST /validate = %d, want 400 for a review without a request", resp.StatusCode)
	}
	// Time for a caBundle to be published and a probe to switch it.
	time.Sleep(5 * time.Second)
	vwc, err := api.Get(ctx, controlplane.ValidationWebhookOff, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if h := vwc.Webhooks[0]; len(h.ClientConfig.CABundle) != 0 || *h.FailurePolicy != admissionregistrationv1.Ignore {
		t.Errorf("with the webhook configuration off, serve patched %s: caBundle %d bytes, failurePolicy %s", vwc.Name, len(h.ClientConfig.CABundle), *h.FailurePolicy)
	}
}
