package controlplane_test

import (
	"context"
	"crypto/tls"
	"log/slog"
	"net/http"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trustmesh/trustmesh/admission"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/freeport"
)

// installIstioCRDs installs Istio's CRDs into the shared apiserver;
// installing them again is a no-op.
func installIstioCRDs(t *testing.T, cfg *rest.Config) {
	t.Helper()
	out, err := exec.Command("go", "list", "-m", "-f", "{{.Dir}}", "istio.io/api").Output()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := envtest.InstallCRDs(cfg, envtest.CRDInstallOptions{ErrorIfPathMissing: true,
		Paths: []string{filepath.Join(strings.TrimSpace(string(out)), "kubernetes", "customresourcedefinitions.gen.yaml")}}); err != nil {
		t.Fatal(err)
	}
}

// validatingWebhook is the chart's ValidatingWebhookConfiguration as
// installed, failurePolicy Ignore and no caBundle, calling addr.
func validatingWebhook(name, addr string) *admissionregistrationv1.ValidatingWebhookConfiguration {
	var ops []admissionregistrationv1.OperationType
	for _, op := range admission.Operations {
		ops = append(ops, admissionregistrationv1.OperationType(op))
	}
	var rules []admissionregistrationv1.RuleWithOperations
	for _, r := range admission.Rules() {
		rules = append(rules, admissionregistrationv1.RuleWithOperations{Operations: ops, Rule: admissionregistrationv1.Rule{
			APIGroups: []string{r.Group}, APIVersions: r.Versions, Resources: []string{r.Resource},
		}})
	}
	url := "https://" + addr + admission.Path
	ignore, none, timeout := admissionregistrationv1.Ignore, admissionregistrationv1.SideEffectClassNone, int32(5)
	return &admissionregistrationv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Webhooks: []admissionregistrationv1.ValidatingWebhook{{
			Name: "validation.trustmesh.io", ClientConfig: admissionregistrationv1.WebhookClientConfig{URL: &url},
			Rules: rules, FailurePolicy: &ignore, SideEffects: &none, AdmissionReviewVersions: []string{"v1"}, TimeoutSeconds: &timeout,
			NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{
				Key: "kubernetes.io/metadata.name", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"kube-system"},
			}}},
		}},
	}
}

// A serve on Kubernetes answers /validate on the webhook port, with
// injection on or off: it publishes the caBundle to its
// ValidatingWebhookConfiguration, switches it from Ignore to Fail once its
// own webhook denies the dry-run probe, and then a policy the engine
// refuses is refused at create, while a good one is stored.
func TestServeValidatesOnKubernetes(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	installIstioCRDs(t, cfg)
	// The policy root namespace, where the probe goes.
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	ic := istioclient.NewForConfigOrDie(cfg)
	for _, tc := range []struct {
		name      string
		injection bool
	}{{"injection on", true}, {"injection off", false}} {
		t.Run(tc.name, func(t *testing.T) {
			name := "trustmesh-validator-" + strings.ReplaceAll(tc.name, " ", "-")
			api := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
			w, err := api.Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name})
			if err != nil {
				t.Fatal(err)
			}
			defer w.Stop()
			// The webhook port is bound first, on port 0 (start's
			// default); then the configuration names it, as the chart's
			// names the Service.
			e := start(t, func(c *controlplane.Config) {
				c.Kubernetes.RestConfig = cfg
				c.Kubernetes.Mode = controlplane.KubernetesOn
				c.Authz.RootNamespace = "shop"
				c.Injector.Disabled = !tc.injection
				c.Admission.WebhookConfig = name
			})
			addr := e.cp.Addrs().Injector.String()
			if _, err := api.Create(ctx, validatingWebhook(name, addr), metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = api.Delete(context.Background(), name, metav1.DeleteOptions{}) })
			timeout := time.After(60 * time.Second)
			for flipped := false; !flipped; {
				select {
				case ev := <-w.ResultChan():
					vwc, ok := ev.Object.(*admissionregistrationv1.ValidatingWebhookConfiguration)
					if !ok {
						continue
					}
					h := vwc.Webhooks[0]
					if *h.FailurePolicy == admissionregistrationv1.Fail {
						if len(h.ClientConfig.CABundle) == 0 {
							t.Fatal("failurePolicy Fail before the caBundle was published")
						}
						flipped = true
					}
				case <-timeout:
					t.Fatal("the ValidatingWebhookConfiguration was never switched to failurePolicy Fail")
				}
			}

			// /inject is served only with injection on; /validate always.
			pool := rootPool(e)
			hc := &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}}}
			defer hc.CloseIdleConnections()
			resp, err := hc.Post("https://"+addr+"/inject", "application/json", strings.NewReader("{}"))
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			if got := resp.StatusCode != http.StatusNotFound; got != tc.injection {
				t.Errorf("POST /inject = %d with injection %v", resp.StatusCode, tc.injection)
			}

			bad := &securityv1.AuthorizationPolicy{
				ObjectMeta: metav1.ObjectMeta{Name: "bad"},
				Spec: apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_DENY, Rules: []*apisecurity.Rule{{
					From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Principals: []string{"cluster.local/ns/a*b/sa/x"}}}},
				}}},
			}
			_, err = ic.SecurityV1().AuthorizationPolicies("shop").Create(ctx, bad, metav1.CreateOptions{})
			if err == nil || !strings.Contains(err.Error(), `admission webhook "validation.trustmesh.io" denied the request`) ||
				!strings.Contains(err.Error(), "may only appear at the start or the end") {
				t.Fatalf("creating a policy the engine refuses = %v, want the webhook's denial with the engine's reason", err)
			}
			good := bad.DeepCopy()
			good.Name = "good-" + strings.ReplaceAll(tc.name, " ", "-")
			good.Spec.Rules[0].From[0].Source.Principals = []string{"cluster.local/ns/a/sa/*"}
			if _, err := ic.SecurityV1().AuthorizationPolicies("shop").Create(ctx, good, metav1.CreateOptions{}); err != nil {
				t.Fatalf("creating a good policy: %v", err)
			}
			// A CUSTOM provider that none of serve's bundles (here: none)
			// defines is refused, as the load would refuse the whole set.
			custom := &securityv1.AuthorizationPolicy{
				ObjectMeta: metav1.ObjectMeta{Name: "ext"},
				Spec: apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_CUSTOM, Rules: []*apisecurity.Rule{{}},
					ActionDetail: &apisecurity.AuthorizationPolicy_Provider{Provider: &apisecurity.AuthorizationPolicy_ExtensionProvider{Name: "rego:nowhere/allow"}}},
			}
			deadline := time.Now().Add(30 * time.Second)
			for {
				_, err = ic.SecurityV1().AuthorizationPolicies("shop").Create(ctx, custom, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
				// The webhook cannot check before the first load: it answers
				// 503, which Ignore admits (a dry run) and Fail refuses.
				if (err == nil || strings.Contains(err.Error(), "no policy set loaded yet")) && time.Now().Before(deadline) {
					time.Sleep(100 * time.Millisecond)
					continue
				}
				break
			}
			if err == nil || !strings.Contains(err.Error(), `spec.provider.name: unknown extension provider: "rego:nowhere/allow"`) ||
				!strings.Contains(err.Error(), "no loaded bundle does") {
				t.Errorf("creating a CUSTOM policy no bundle serves = %v, want the webhook's denial with the load's reason", err)
			}
			// The probe was a dry run: it was never stored.
			if _, err := ic.SecurityV1().AuthorizationPolicies("shop").Get(ctx, controlplane.ProbeName, metav1.GetOptions{}); !apierrors.IsNotFound(err) {
				t.Errorf("the probe policy: %v, want not found", err)
			}
		})
	}
}

// warnings is a slog handler that sends each warning, with its error, to a
// channel.
type warnings chan string

func (w warnings) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (w warnings) Handle(_ context.Context, r slog.Record) error {
	msg := r.Message
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "error" {
			msg += ": " + a.Value.String()
		}
		return true
	})
	select {
	case w <- msg:
	default:
	}
	return nil
}
func (w warnings) WithAttrs([]slog.Attr) slog.Handler { return w }
func (w warnings) WithGroup(string) slog.Handler      { return w }

// A ValidatingWebhookConfiguration whose webhook never answers (it calls
// an address nothing serves) is left at Ignore: the control plane never
// switches while its probe fails, and logs why.
func TestServeLeavesIgnoreWhileTheWebhookDoesNotAnswer(t *testing.T) {
	ctx := context.Background()
	cfg, cs := kube(t)
	installIstioCRDs(t, cfg)
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "unanswered"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	const name = "trustmesh-validator-unanswered"
	api := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	// The configuration calls an address nothing listens on.
	if _, err := api.Create(ctx, validatingWebhook(name, freeport.Addr(t)), metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.Delete(context.Background(), name, metav1.DeleteOptions{}) })
	logs := make(warnings, 100)
	start(t, func(c *controlplane.Config) {
		c.Kubernetes.RestConfig = cfg
		c.Kubernetes.Mode = controlplane.KubernetesOn
		c.Authz.RootNamespace = "unanswered"
		c.Admission.WebhookConfig = name
		c.Log = slog.New(logs)
	})
	timeout := time.After(60 * time.Second)
	for failures := 0; failures < 2; {
		select {
		case msg := <-logs:
			if strings.Contains(msg, "failurePolicy stays Ignore") && strings.Contains(msg, "was admitted") {
				failures++
			}
		case <-timeout:
			t.Fatal("timed out waiting for the failed probes to be logged")
		}
	}
	vwc, err := api.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	h := vwc.Webhooks[0]
	if len(h.ClientConfig.CABundle) == 0 {
		t.Error("the caBundle was not published")
	}
	if *h.FailurePolicy != admissionregistrationv1.Ignore {
		t.Errorf("failurePolicy %s while the webhook does not answer, want Ignore", *h.FailurePolicy)
	}
}
