package deploy_test

import (
	"slices"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/trustmesh/trustmesh/admission"
	"github.com/trustmesh/trustmesh/deploy"
)

func convert[T any](t *testing.T, objs []*unstructured.Unstructured, kind, name string) *T {
	t.Helper()
	o := find(objs, kind, name)
	if o == nil {
		t.Fatalf("no %s %s", kind, name)
	}
	var out T
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &out); err != nil {
		t.Fatal(err)
	}
	return &out
}

// noInjection is the chart without the injector (and so without the
// gateways it completes).
func noInjection() map[string]any {
	return map[string]any{"injection": map[string]any{"enabled": false},
		"gateways": map[string]any{"ingress": map[string]any{"enabled": false}, "egress": map[string]any{"enabled": false}}}
}

// The chart's ValidatingWebhookConfiguration lists exactly what the
// validator validates (admission.Rules, admission.Operations), so that a
// kind added to the validator without the chart fails here; it calls
// /validate on the control plane's Service, whose serve listens off
// loopback with injection on or off and keeps the configuration current;
// it is installed with failurePolicy Ignore, for the control plane to
// switch, and leaves kube-system out but not the release namespace, where
// the control plane's probe goes.
func TestValidatingWebhook(t *testing.T) {
	for name, values := range map[string]map[string]any{"defaults": nil, "production": haValues(), "no injection": noInjection()} {
		t.Run(name, func(t *testing.T) {
			objs, err := deploy.Render(deploy.RenderOptions{Values: values})
			if err != nil {
				t.Fatal(err)
			}
			vwcName := "trustmesh-validator-" + deploy.DefaultNamespace
			vwc := convert[admissionregistrationv1.ValidatingWebhookConfiguration](t, objs, "ValidatingWebhookConfiguration", vwcName)
			if len(vwc.Webhooks) != 1 {
				t.Fatalf("%d webhooks, want 1", len(vwc.Webhooks))
			}
			w := vwc.Webhooks[0]
			var want []admissionregistrationv1.RuleWithOperations
			var ops []admissionregistrationv1.OperationType
			for _, op := range admission.Operations {
				ops = append(ops, admissionregistrationv1.OperationType(op))
			}
			scope := admissionregistrationv1.NamespacedScope
			for _, r := range admission.Rules() {
				want = append(want, admissionregistrationv1.RuleWithOperations{Operations: ops, Rule: admissionregistrationv1.Rule{
					APIGroups: []string{r.Group}, APIVersions: r.Versions, Resources: []string{r.Resource}, Scope: &scope,
				}})
			}
			if len(w.Rules) != len(want) {
				t.Errorf("%d rules, want %d (admission.Rules)", len(w.Rules), len(want))
			}
			for i := range min(len(w.Rules), len(want)) {
				g, x := w.Rules[i], want[i]
				if !slices.Equal(g.Operations, x.Operations) || !slices.Equal(g.APIGroups, x.APIGroups) || !slices.Equal(g.APIVersions, x.APIVersions) ||
					!slices.Equal(g.Resources, x.Resources) || g.Scope == nil || *g.Scope != scope {
					t.Errorf("rule %d = %+v, want %+v", i, g, x)
				}
			}
			svc := w.ClientConfig.Service
			if svc == nil || svc.Name != "trustmesh" || svc.Namespace != deploy.DefaultNamespace || svc.Path == nil || *svc.Path != admission.Path || svc.Port == nil || *svc.Port != 443 {
				t.Errorf("clientConfig.service = %+v, want trustmesh.%s:443%s", svc, deploy.DefaultNamespace, admission.Path)
			}
			if len(w.ClientConfig.CABundle) != 0 {
				t.Error("the chart sets a caBundle; the control plane owns it")
			}
			if w.FailurePolicy == nil || *w.FailurePolicy != admissionregistrationv1.Ignore {
				t.Errorf("failurePolicy %v, want Ignore at install", w.FailurePolicy)
			}
			if w.SideEffects == nil || *w.SideEffects != admissionregistrationv1.SideEffectClassNone {
				t.Error("sideEffects is not None")
			}
			if !slices.Equal(w.AdmissionReviewVersions, []string{"v1"}) {
				t.Errorf("admissionReviewVersions %v, want [v1]", w.AdmissionReviewVersions)
			}
			if w.TimeoutSeconds == nil || *w.TimeoutSeconds < 1 || *w.TimeoutSeconds > 30 {
				t.Errorf("timeoutSeconds %v", w.TimeoutSeconds)
			}
			sel, err := metav1LabelSelector(w)
			if err != nil {
				t.Fatal(err)
			}
			for ns, called := range map[string]bool{"kube-system": false, deploy.DefaultNamespace: true, "shop": true} {
				if got := sel.Matches(labels.Set{"kubernetes.io/metadata.name": ns}); got != called {
					t.Errorf("namespace %s: called %v, want %v", ns, got, called)
				}
			}

			// The Service routes 443 to the webhook port serve listens on.
			service := convert[corev1.Service](t, objs, "Service", "trustmesh")
			var target string
			for _, p := range service.Spec.Ports {
				if p.Port == 443 {
					target = p.TargetPort.String()
				}
			}
			dep := convert[appsv1.Deployment](t, objs, "Deployment", "trustmesh")
			c := dep.Spec.Template.Spec.Containers[0]
			var port int32
			for _, p := range c.Ports {
				if p.Name == target {
					port = p.ContainerPort
				}
			}
			if port != 15017 {
				t.Errorf("Service port 443 goes to %q (container port %d), want the webhook port 15017", target, port)
			}
			args := strings.Join(c.Args, " ")
			for _, a := range []string{"--listen-injector=:15017", "--validation-webhook-config=" + vwcName} {
				if !slices.Contains(c.Args, a) {
					t.Errorf("serve is not given %s: %s", a, args)
				}
			}
			if injection := values == nil || name == "production"; slices.Contains(c.Args, "--injection=false") == injection {
				t.Errorf("injection %v, but serve's args are %s", injection, args)
			}
		})
	}
}

func metav1LabelSelector(w admissionregistrationv1.ValidatingWebhook) (labels.Selector, error) {
	if w.NamespaceSelector == nil {
		return labels.Everything(), nil
	}
	return metav1.LabelSelectorAsSelector(w.NamespaceSelector)
}

// The chart installs a CRD for every kind the control plane reads, which
// the webhook validates, serving every version the webhook lists: the
// control plane cannot start on a cluster without them.
func TestCRDsCoverEveryKindTheControlPlaneReads(t *testing.T) {
	objs, err := deploy.Render(deploy.RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range admission.Rules() {
		name := r.Resource + "." + r.Group
		o := find(objs, "CustomResourceDefinition", name)
		if o == nil {
			t.Errorf("the chart does not install the CRD %s", name)
			continue
		}
		crd := convert[apiextensionsv1.CustomResourceDefinition](t, objs, "CustomResourceDefinition", name)
		var served []string
		for _, v := range crd.Spec.Versions {
			if v.Served {
				served = append(served, v.Name)
			}
		}
		for _, v := range r.Versions {
			if !slices.Contains(served, v) {
				t.Errorf("CRD %s does not serve %s (serves %v)", name, v, served)
			}
		}
	}
}

// With several replicas the PodDisruptionBudget covers the control plane's
// pods and keeps at least one serving the webhook; a budget that lets all
// go is refused at render.
func TestPodDisruptionBudgetKeepsTheWebhook(t *testing.T) {
	for _, tc := range []struct {
		name           string
		maxUnavailable any
		ok             bool
	}{
		{"default", nil, true},
		{"two of three", 2, true},
		{"half", "50%", true},
		{"all", 3, false},
		{"more than all", 5, false},
		{"every percent", "100%", false},
		{"rounded up to all", "70%", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			values := haValues()
			if tc.maxUnavailable != nil {
				values["podDisruptionBudget"] = map[string]any{"maxUnavailable": tc.maxUnavailable}
			}
			objs, err := deploy.Render(deploy.RenderOptions{Values: values})
			if !tc.ok {
				if err == nil || !strings.Contains(err.Error(), "validating webhook") {
					t.Fatalf("render = %v, want a refusal naming the webhook", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			dep := convert[appsv1.Deployment](t, objs, "Deployment", "trustmesh")
			pdb := convert[policyv1.PodDisruptionBudget](t, objs, "PodDisruptionBudget", "trustmesh")
			replicas := int(*dep.Spec.Replicas)
			if replicas < 2 {
				t.Fatalf("%d replicas in the production profile", replicas)
			}
			sel := labels.SelectorFromSet(pdb.Spec.Selector.MatchLabels)
			if !sel.Matches(labels.Set(dep.Spec.Template.Labels)) {
				t.Error("the PodDisruptionBudget does not select the control plane's pods")
			}
			down, err := intstr.GetScaledValueFromIntOrPercent(pdb.Spec.MaxUnavailable, replicas, true)
			if err != nil {
				t.Fatal(err)
			}
			if down >= replicas {
				t.Errorf("maxUnavailable %v of %d replicas lets the webhook go", pdb.Spec.MaxUnavailable, replicas)
			}
		})
	}
}
