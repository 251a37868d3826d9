package deploy_test

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	apiextensionsv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"sigs.k8s.io/controller-runtime/pkg/envtest"

	"github.com/trustmesh/trustmesh/admission"
	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authn"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/deploy"
	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/injector/cabundle"
	"github.com/trustmesh/trustmesh/injector/webhook"
)

// TestRBACSufficesForTheBundlePublishers installs the chart's RBAC and
// webhook configuration for real, then runs the caBundle patcher and the
// root-cert publisher as the control plane's service account: the
// least-privilege rules, limited by resourceNames, must be enough for them,
// and must not reach beyond.
func TestRBACSufficesForTheBundlePublishers(t *testing.T) {
	cfg := kube(t)
	admin := kubernetes.NewForConfigOrDie(cfg)
	a := newApplier(t, cfg)
	ctx := context.Background()
	const ns = "rbac-test"
	ensureNamespaces(t, admin, ns, "trustmesh-gateways", "rbac-workloads")

	// A control plane that switches the validating webhook to Fail, and so
	// sends the probe.
	objs, err := deploy.Render(deploy.RenderOptions{Namespace: ns, Values: map[string]any{"validation": map[string]any{"failurePolicy": "Fail"}}})
	if err != nil {
		t.Fatal(err)
	}
	var webhookName, validationName string
	var crdObjs []*apiextensionsv1.CustomResourceDefinition
	for _, obj := range objs {
		switch obj.GetKind() {
		case "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount":
		case "CustomResourceDefinition":
			var crd apiextensionsv1.CustomResourceDefinition
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj.Object, &crd); err != nil {
				t.Fatal(err)
			}
			crdObjs = append(crdObjs, &crd)
			continue
		case "ValidatingWebhookConfiguration":
			// As the MutatingWebhookConfiguration below: called for no
			// namespace.
			var vwc admissionregistrationv1.ValidatingWebhookConfiguration
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj.Object, &vwc); err != nil {
				t.Fatal(err)
			}
			validationName = vwc.Name
			for i := range vwc.Webhooks {
				vwc.Webhooks[i].NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"rbac-test": "none"}}
			}
			if _, err := admin.AdmissionregistrationV1().ValidatingWebhookConfigurations().Create(ctx, &vwc, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = admin.AdmissionregistrationV1().ValidatingWebhookConfigurations().Delete(context.Background(), vwc.Name, metav1.DeleteOptions{})
			})
			continue
		case "MutatingWebhookConfiguration":
			// Point it nowhere callable, and ignore failures, so that it
			// does not stand in the way of other tests' pods.
			var mwc admissionregistrationv1.MutatingWebhookConfiguration
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj.Object, &mwc); err != nil {
				t.Fatal(err)
			}
			webhookName = mwc.Name
			ignore := admissionregistrationv1.Ignore
			for i := range mwc.Webhooks {
				mwc.Webhooks[i].FailurePolicy = &ignore
				mwc.Webhooks[i].NamespaceSelector = &metav1.LabelSelector{MatchLabels: map[string]string{"rbac-test": "none"}}
			}
			if _, err := admin.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, &mwc, metav1.CreateOptions{}); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() {
				_ = admin.AdmissionregistrationV1().MutatingWebhookConfigurations().Delete(context.Background(), mwc.Name, metav1.DeleteOptions{})
			})
			continue
		default:
			continue
		}
		gvk := obj.GroupVersionKind()
		m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
		if err != nil {
			t.Fatal(err)
		}
		ri := a.dyn.Resource(m.Resource)
		if m.Scope.Name() == meta.RESTScopeNameNamespace {
			_, err = ri.Namespace(obj.GetNamespace()).Create(ctx, obj, metav1.CreateOptions{})
		} else {
			_, err = ri.Create(ctx, obj, metav1.CreateOptions{})
		}
		if err != nil {
			t.Fatalf("%s %s: %v", gvk.Kind, obj.GetName(), err)
		}
	}

	// The chart's own CRDs, for the validating webhook's probe.
	if _, err := envtest.InstallCRDs(cfg, envtest.CRDInstallOptions{CRDs: crdObjs}); err != nil {
		t.Fatal(err)
	}

	sa := rest.CopyConfig(cfg)
	sa.Impersonate = rest.ImpersonationConfig{UserName: "system:serviceaccount:" + ns + ":trustmesh"}
	cs := kubernetes.NewForConfigOrDie(sa)

	// The injection webhook reads namespaces' labels (ambient mode) as
	// the control plane.
	namespaces, err := webhook.NewNamespaces(cs)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := namespaces.NamespaceLabels("rbac-workloads"); err != nil {
		t.Fatalf("reading a namespace's labels as the control plane: %v", err)
	}

	// RBAC is enforced here: the account reads no Secret beyond the CA's.
	if _, err := cs.CoreV1().Secrets(ns).Get(ctx, "someone-elses", metav1.GetOptions{}); !apierrors.IsForbidden(err) {
		t.Fatalf("reading another Secret: %v, want Forbidden", err)
	}

	// The CA reads the keys that sign service-account tokens. Kubernetes
	// grants this to every service account by default, so the read alone
	// would pass without the chart; the chart's own rule keeps it where an
	// administrator removed that binding.
	if _, err := cs.CoreV1().RESTClient().Get().AbsPath("/openid/v1/jwks").DoRaw(ctx); err != nil {
		t.Fatalf("reading the token keys: %v", err)
	}
	var jwksRule bool
	for _, obj := range objs {
		if obj.GetKind() != "ClusterRole" {
			continue
		}
		var role rbacv1.ClusterRole
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(obj.Object, &role); err != nil {
			t.Fatal(err)
		}
		for _, r := range role.Rules {
			jwksRule = jwksRule || slices.Contains(r.NonResourceURLs, "/openid/v1/jwks") && slices.Contains(r.Verbs, "get")
		}
	}
	if !jwksRule {
		t.Fatal("the chart's ClusterRole does not grant GET /openid/v1/jwks")
	}

	// Renewal re-checks a Kubernetes workload's service account against
	// the authenticator's cache of service accounts, which lists and
	// watches them as the control plane; without the rule the cache never
	// syncs and every renewal is refused as unavailable.
	acct, err := admin.CoreV1().ServiceAccounts("rbac-workloads").Create(ctx,
		&corev1.ServiceAccount{ObjectMeta: metav1.ObjectMeta{Name: "renewing"}}, metav1.CreateOptions{})
	if err != nil {
		t.Fatal(err)
	}
	kubeAuth, err := authn.NewKubernetes(authn.KubernetesConfig{TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"), Client: cs})
	if err != nil {
		t.Fatal(err)
	}
	actx, stopAccounts := context.WithCancel(ctx)
	accountsDone := make(chan error, 1)
	go func() { accountsDone <- kubeAuth.Run(actx) }()
	defer func() {
		stopAccounts()
		<-accountsDone
	}()
	renewing := spiffeid.RequireFromString("spiffe://cluster.local/ns/rbac-workloads/sa/renewing")
	var checkErr error
	for deadline := time.Now().Add(30 * time.Second); time.Now().Before(deadline); time.Sleep(250 * time.Millisecond) {
		if checkErr = kubeAuth.CheckServiceAccount(ctx, renewing, string(acct.UID)); checkErr == nil {
			break
		}
	}
	if checkErr != nil {
		t.Fatalf("renewal's service-account re-check as the control plane: %v", checkErr)
	}
	if err := kubeAuth.CheckServiceAccount(ctx, renewing, "another-uid"); err == nil {
		t.Fatal("renewal's re-check accepted an account recorded with another uid")
	} else if r, ok := ca.AsRefusal(err); !ok || r.Kind != ca.KindDenied {
		t.Fatalf("renewal's re-check of an account recorded with another uid = %v; want denied", err)
	}

	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	m, err := authority.Generate(ctx, td, time.Now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	auth := authority.New(td, m)
	b, _ := auth.Bundle()
	want, err := cabundle.PEM(b)
	if err != nil {
		t.Fatal(err)
	}
	patcher, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{Client: cs, Name: webhookName, Bundle: auth})
	if err != nil {
		t.Fatal(err)
	}
	validation, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{Client: cs, Kind: cabundle.Validating, Name: validationName, Bundle: auth})
	if err != nil {
		t.Fatal(err)
	}
	publisher, err := cabundle.NewRootCertPublisher(cabundle.RootCertConfig{Client: cs, Bundle: auth})
	if err != nil {
		t.Fatal(err)
	}
	rctx, cancel := context.WithCancel(ctx)
	done := make(chan error, 3)
	go func() { done <- patcher.Run(rctx) }()
	go func() { done <- validation.Run(rctx) }()
	go func() { done <- publisher.Run(rctx) }()
	defer func() {
		cancel()
		for range 3 {
			if err := <-done; err != nil {
				t.Error(err)
			}
		}
	}()

	mw, err := admin.AdmissionregistrationV1().MutatingWebhookConfigurations().Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + webhookName})
	if err != nil {
		t.Fatal(err)
	}
	waitWatch(t, mw, func(o runtime.Object) bool {
		m, ok := o.(*admissionregistrationv1.MutatingWebhookConfiguration)
		return ok && string(m.Webhooks[0].ClientConfig.CABundle) == string(want)
	})
	vw, err := admin.AdmissionregistrationV1().ValidatingWebhookConfigurations().Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + validationName})
	if err != nil {
		t.Fatal(err)
	}
	waitWatch(t, vw, func(o runtime.Object) bool {
		v, ok := o.(*admissionregistrationv1.ValidatingWebhookConfiguration)
		return ok && string(v.Webhooks[0].ClientConfig.CABundle) == string(want)
	})
	// The validating webhook's readiness probe: a dry-run create of an
	// AuthorizationPolicy, which the account may send in the policy root
	// namespace (the release's), and nowhere else.
	probe := &unstructured.Unstructured{Object: map[string]any{
		"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
		"metadata": map[string]any{"name": "probe", "namespace": ns},
		"spec":     map[string]any{"action": "DENY"},
	}}
	apGVR := schema.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"}
	if _, err := dynamic.NewForConfigOrDie(sa).Resource(apGVR).Namespace(ns).Create(ctx, probe, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); err != nil {
		t.Fatalf("the probe's dry-run create as the control plane: %v", err)
	}
	for _, other := range []string{"rbac-workloads", "trustmesh-gateways"} {
		elsewhere := probe.DeepCopy()
		elsewhere.SetNamespace(other)
		if _, err := dynamic.NewForConfigOrDie(sa).Resource(apGVR).Namespace(other).Create(ctx, elsewhere, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}); !apierrors.IsForbidden(err) {
			t.Errorf("creating an AuthorizationPolicy in %s as the control plane: %v, want Forbidden", other, err)
		}
	}
	if clusterRoleGrants(t, objs, "authorizationpolicies", "create") {
		t.Error("the ClusterRole may create AuthorizationPolicies")
	}
	// The control plane reads every kind the webhook validates (the mesh
	// model and the policies).
	for _, r := range admission.Rules() {
		gvr := schema.GroupVersionResource{Group: r.Group, Version: r.Versions[0], Resource: r.Resource}
		if _, err := dynamic.NewForConfigOrDie(sa).Resource(gvr).List(ctx, metav1.ListOptions{}); err != nil {
			t.Errorf("listing %s as the control plane: %v", r.Resource, err)
		}
	}
	cw, err := admin.CoreV1().ConfigMaps("rbac-workloads").Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + injector.RootCertConfigMap})
	if err != nil {
		t.Fatal(err)
	}
	waitWatch(t, cw, func(o runtime.Object) bool {
		c, ok := o.(interface{ GetName() string })
		return ok && c.GetName() == injector.RootCertConfigMap
	})
}

// TestRBACLetsRenewalReadServiceAccounts: renewal re-checks a Kubernetes
// workload's service account against a cache that lists and watches
// service accounts (and asks the apiserver about one it lacks); the chart
// must grant exactly the reads, and nothing that writes them.
func TestRBACLetsRenewalReadServiceAccounts(t *testing.T) {
	objs, err := deploy.Render(deploy.RenderOptions{Namespace: deploy.DefaultNamespace})
	if err != nil {
		t.Fatal(err)
	}
	for _, verb := range []string{"get", "list", "watch"} {
		if !clusterRoleGrants(t, objs, "serviceaccounts", verb) {
			t.Errorf("the ClusterRole does not grant %s on serviceaccounts", verb)
		}
	}
	for _, verb := range []string{"create", "update", "patch", "delete", "deletecollection"} {
		if clusterRoleGrants(t, objs, "serviceaccounts", verb) {
			t.Errorf("the ClusterRole grants %s on serviceaccounts", verb)
		}
	}
}
