package admission_test

import (
	"context"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	apinetworking "istio.io/api/networking/v1alpha3"
	apisecurity "istio.io/api/security/v1beta1"
	networkingv1alpha3 "istio.io/client-go/pkg/apis/networking/v1alpha3"
	networkingv1beta1 "istio.io/client-go/pkg/apis/networking/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	"istio.io/client-go/pkg/clientset/versioned"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"github.com/trustmesh/trustmesh/admission"
	"github.com/trustmesh/trustmesh/authz/source/kube"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// One real kube-apiserver with Istio's CRDs for the package.
var apiserver = kubeapi.Shared{CRDs: kubeapi.IstioCRDs}

func TestMain(m *testing.M) { apiserver.Main(m) }

// warnings collects the warnings the apiserver returns, as kubectl prints
// them.
type warnings struct {
	mu  sync.Mutex
	got []string
}

func (w *warnings) HandleWarningHeader(_ int, _ string, text string) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.got = append(w.got, text)
}

func (w *warnings) take() []string {
	w.mu.Lock()
	defer w.mu.Unlock()
	out := w.got
	w.got = nil
	return out
}

// webhookConfig is a ValidatingWebhookConfiguration of every rule of
// admission.Rules, calling url.
func webhookConfig(name, url string, caBundle []byte, policy admissionregistrationv1.FailurePolicyType) *admissionregistrationv1.ValidatingWebhookConfiguration {
	var rules []admissionregistrationv1.RuleWithOperations
	var ops []admissionregistrationv1.OperationType
	for _, op := range admission.Operations {
		ops = append(ops, admissionregistrationv1.OperationType(op))
	}
	for _, r := range admission.Rules() {
		scope := admissionregistrationv1.NamespacedScope
		rules = append(rules, admissionregistrationv1.RuleWithOperations{Operations: ops, Rule: admissionregistrationv1.Rule{
			APIGroups: []string{r.Group}, APIVersions: r.Versions, Resources: []string{r.Resource}, Scope: &scope,
		}})
	}
	none := admissionregistrationv1.SideEffectClassNone
	timeout := int32(5)
	return &admissionregistrationv1.ValidatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Webhooks: []admissionregistrationv1.ValidatingWebhook{{
			Name:                    "validation.trustmesh.io",
			ClientConfig:            admissionregistrationv1.WebhookClientConfig{URL: &url, CABundle: caBundle},
			Rules:                   rules,
			FailurePolicy:           &policy,
			SideEffects:             &none,
			AdmissionReviewVersions: []string{"v1"},
			TimeoutSeconds:          &timeout,
			NamespaceSelector: &metav1.LabelSelector{MatchExpressions: []metav1.LabelSelectorRequirement{{
				Key: "kubernetes.io/metadata.name", Operator: metav1.LabelSelectorOpNotIn, Values: []string{"kube-system"},
			}}},
		}},
	}
}

func jwtPolicy(ns, name string) *securityv1.AuthorizationPolicy {
	return &securityv1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{
			From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{
				Principals: []string{"cluster.local/ns/shop/sa/web"}, RequestPrincipals: []string{"issuer/subject"},
			}}},
		}}},
	}
}

// extPolicy is refused by the engine's check, not the parser's.
func extPolicy(ns, name string) *securityv1beta1.AuthorizationPolicy {
	return &securityv1beta1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: apisecurity.AuthorizationPolicy{Action: apisecurity.AuthorizationPolicy_CUSTOM, Rules: []*apisecurity.Rule{{}},
			ActionDetail: &apisecurity.AuthorizationPolicy_Provider{Provider: &apisecurity.AuthorizationPolicy_ExtensionProvider{Name: "opa"}}}}
}

func allowPolicy(ns, name string) *securityv1.AuthorizationPolicy {
	return &securityv1.AuthorizationPolicy{
		ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: name},
		Spec: apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{
			From: []*apisecurity.Rule_From{{Source: &apisecurity.Source{Principals: []string{"cluster.local/ns/shop/sa/web"}}}},
		}}},
	}
}

// denial returns the Status of an admission denial, failing t for any
// other error.
func denial(t *testing.T, err error) *metav1.Status {
	t.Helper()
	var status apierrors.APIStatus
	if err == nil || !errors.As(err, &status) {
		t.Fatalf("error %v, want an admission denial", err)
	}
	st := status.Status()
	return &st
}

// deniedBy is the prefix the apiserver gives a webhook's denial message.
const deniedBy = `admission webhook "validation.trustmesh.io" denied the request: `

// TestWebhookInAPIServer registers the webhook, served over TLS on
// loopback, in a real kube-apiserver with Istio's CRDs, and applies objects
// as kubectl would.
func TestWebhookInAPIServer(t *testing.T) {
	cfg := rest.CopyConfig(apiserver.Config(t))
	warned := &warnings{}
	cfg.WarningHandler = warned
	cs := kubernetes.NewForConfigOrDie(cfg)
	istio := versioned.NewForConfigOrDie(cfg)
	ctx := context.Background()
	for _, ns := range []string{"shop", "edge", "down"} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}

	h, err := admission.NewHandler(admission.HandlerConfig{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewUnstartedServer(h)
	srv.StartTLS()
	t.Cleanup(srv.Close)
	caBundle := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
	vwc := webhookConfig("trustmesh-test-validation", srv.URL+admission.Path, caBundle, admissionregistrationv1.Fail)
	vwcs := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	if _, err := vwcs.Create(ctx, vwc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = vwcs.Delete(context.Background(), vwc.Name, metav1.DeleteOptions{}) })
	// The apiserver picks the configuration up asynchronously.
	dryRun := metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}}
	waitUntil(t, "the webhook is called", func() bool {
		_, err := istio.SecurityV1().AuthorizationPolicies("shop").Create(ctx, jwtPolicy("shop", "probe"), dryRun)
		return err != nil && strings.Contains(err.Error(), deniedBy)
	})

	aps := istio.SecurityV1().AuthorizationPolicies("shop")
	t.Run("bad policy is refused with the field and the reason", func(t *testing.T) {
		_, err := aps.Create(ctx, jwtPolicy("shop", "jwt"), metav1.CreateOptions{})
		st := denial(t, err)
		_, loadErr := kube.ConvertV1(jwtPolicy("shop", "jwt"))
		if st.Message != deniedBy+loadErr.Error() {
			t.Errorf("message\n%s\nwant the load's\n%s", st.Message, loadErr)
		}
		if st.Code != 422 || st.Reason != metav1.StatusReasonInvalid || st.Details == nil || len(st.Details.Causes) != 1 {
			t.Fatalf("denial %+v, want 422 Invalid with one cause", st)
		}
		if c := st.Details.Causes[0]; c.Field != "spec.rules[0].from[0].source.requestPrincipals" ||
			c.Type != metav1.CauseTypeFieldValueNotSupported || !strings.Contains(c.Message, "request authentication (JWT)") {
			t.Errorf("cause %+v", c)
		}
		if _, err := aps.Get(ctx, "jwt", metav1.GetOptions{}); !apierrors.IsNotFound(err) {
			t.Errorf("refused policy stored: %v", err)
		}
	})
	t.Run("a provider the engine refuses, in v1beta1", func(t *testing.T) {
		_, err := istio.SecurityV1beta1().AuthorizationPolicies("shop").Create(ctx, extPolicy("shop", "ext"), metav1.CreateOptions{})
		st := denial(t, err)
		if st.Details == nil || len(st.Details.Causes) != 1 || st.Details.Causes[0].Field != "spec.provider.name" ||
			!strings.Contains(st.Message, `unknown extension provider: "opa": providers are Rego decisions named rego:<path>`) {
			t.Errorf("denial %+v", st)
		}
	})
	t.Run("good policy is stored, and an update that breaks it refused", func(t *testing.T) {
		stored, err := aps.Create(ctx, allowPolicy("shop", "web"), metav1.CreateOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if w := warned.take(); len(w) > 0 {
			t.Errorf("warnings on a good policy: %q", w)
		}
		broken := stored.DeepCopy()
		broken.Spec.Rules[0].From[0].Source.NotRequestPrincipals = []string{"*"}
		_, err = aps.Update(ctx, broken, metav1.UpdateOptions{})
		if st := denial(t, err); st.Details == nil || len(st.Details.Causes) != 1 ||
			st.Details.Causes[0].Field != "spec.rules[0].from[0].source.notRequestPrincipals" {
			t.Errorf("denial %+v", st)
		}
		got, err := aps.Get(ctx, "web", metav1.GetOptions{})
		if err != nil || got.ResourceVersion != stored.ResourceVersion || len(got.Spec.Rules[0].From[0].Source.Principals) != 1 {
			t.Errorf("stored policy changed: %v %+v", err, got)
		}
		// A change that keeps it valid goes through, and so does delete.
		got.Spec.Rules[0].From[0].Source.Principals = append(got.Spec.Rules[0].From[0].Source.Principals, "cluster.local/ns/shop/sa/api")
		if _, err := aps.Update(ctx, got, metav1.UpdateOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := aps.Delete(ctx, "web", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
	})
	t.Run("a policy being deleted cannot be broken, and its finalizer can go", func(t *testing.T) {
		// A namespace user who may create, delete and update policies
		// holds one with a finalizer, deletes it, and patches its spec: the
		// load still reads a terminating object, so a refused spec would
		// freeze every policy update of the mesh.
		p := allowPolicy("shop", "held")
		p.Finalizers = []string{"example.com/hold"}
		if _, err := aps.Create(ctx, p, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if err := aps.Delete(ctx, "held", metav1.DeleteOptions{}); err != nil {
			t.Fatal(err)
		}
		patch := []byte(`{"spec":{"rules":[{"from":[{"source":{"requestPrincipals":["a/b"]}}]}]}}`)
		_, err := aps.Patch(ctx, "held", types.MergePatchType, patch, metav1.PatchOptions{})
		if st := denial(t, err); st.Details == nil || len(st.Details.Causes) == 0 ||
			st.Details.Causes[0].Field != "spec.rules[0].from[0].source.requestPrincipals" {
			t.Errorf("denial %+v", st)
		}
		_, err = aps.Patch(ctx, "held", types.MergePatchType, []byte(`{"metadata":{"annotations":{"istio.io/dry-run":"maybe"}}}`), metav1.PatchOptions{})
		if st := denial(t, err); st.Details == nil || len(st.Details.Causes) != 1 ||
			st.Details.Causes[0].Field != "metadata.annotations[istio.io/dry-run]" {
			t.Errorf("denial %+v", st)
		}
		got, err := aps.Get(ctx, "held", metav1.GetOptions{})
		if err != nil || got.DeletionTimestamp == nil || len(got.Spec.Rules[0].From[0].Source.RequestPrincipals) != 0 {
			t.Fatalf("terminating policy changed: %v %+v", err, got)
		}
		// Removing the finalizer, a metadata-only edit, goes through.
		if _, err := aps.Patch(ctx, "held", types.MergePatchType, []byte(`{"metadata":{"finalizers":null}}`), metav1.PatchOptions{}); err != nil {
			t.Fatal(err)
		}
		waitUntil(t, "the policy is gone", func() bool {
			_, err := aps.Get(ctx, "held", metav1.GetOptions{})
			return apierrors.IsNotFound(err)
		})
	})
	t.Run("PERMISSIVE PeerAuthentication is stored with a warning", func(t *testing.T) {
		pa := &securityv1.PeerAuthentication{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: "default"},
			Spec: apisecurity.PeerAuthentication{Mtls: &apisecurity.PeerAuthentication_MutualTLS{Mode: apisecurity.PeerAuthentication_MutualTLS_PERMISSIVE}}}
		if _, err := istio.SecurityV1().PeerAuthentications("shop").Create(ctx, pa, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		w := warned.take()
		if len(w) != 1 || !strings.Contains(w[0], "trustmesh ignores PeerAuthentication shop/default: mtls.mode PERMISSIVE refused") {
			t.Errorf("warnings %q", w)
		}
	})
	t.Run("v1alpha3 ServiceEntry is validated", func(t *testing.T) {
		se := func(name string, loc apinetworking.ServiceEntry_Location) *networkingv1alpha3.ServiceEntry {
			return &networkingv1alpha3.ServiceEntry{ObjectMeta: metav1.ObjectMeta{Namespace: "shop", Name: name},
				Spec: apinetworking.ServiceEntry{Hosts: []string{name + ".example.com"}, Location: loc, Resolution: apinetworking.ServiceEntry_DNS,
					Ports: []*apinetworking.ServicePort{{Number: 80, Name: "http", Protocol: "HTTP"}}}}
		}
		ses := istio.NetworkingV1alpha3().ServiceEntries("shop")
		if _, err := ses.Create(ctx, se("api", apinetworking.ServiceEntry_MESH_EXTERNAL), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if w := warned.take(); len(w) > 0 {
			t.Errorf("warnings on an external ServiceEntry: %q", w)
		}
		if _, err := ses.Create(ctx, se("db", apinetworking.ServiceEntry_MESH_INTERNAL), metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if w := warned.take(); len(w) != 1 || !strings.Contains(w[0], "trustmesh ignores ServiceEntry shop/db: only location MESH_EXTERNAL is supported") {
			t.Errorf("warnings %q", w)
		}
	})
	t.Run("v1beta1 Gateway with a server trustmesh skips, and a v1alpha3 VirtualService", func(t *testing.T) {
		gw := &networkingv1beta1.Gateway{ObjectMeta: metav1.ObjectMeta{Namespace: "edge", Name: "in"},
			Spec: apinetworking.Gateway{Selector: map[string]string{"istio": "ingressgateway"}, Servers: []*apinetworking.Server{
				{Port: &apinetworking.Port{Number: 443, Name: "https", Protocol: "HTTPS"}, Hosts: []string{"a.example.com"},
					Tls: &apinetworking.ServerTLSSettings{Mode: apinetworking.ServerTLSSettings_SIMPLE, CredentialName: "a"}},
				{Port: &apinetworking.Port{Number: 8443, Name: "tls", Protocol: "TLS"}, Hosts: []string{"b.example.com"},
					Tls: &apinetworking.ServerTLSSettings{Mode: apinetworking.ServerTLSSettings_PASSTHROUGH}},
			}}}
		if _, err := istio.NetworkingV1beta1().Gateways("edge").Create(ctx, gw, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if w := warned.take(); len(w) != 1 || !strings.Contains(w[0], "trustmesh ignores Gateway edge/in: servers[1]: tls.mode PASSTHROUGH is not supported") {
			t.Errorf("warnings %q", w)
		}
		vs := &networkingv1alpha3.VirtualService{ObjectMeta: metav1.ObjectMeta{Namespace: "edge", Name: "web"},
			Spec: apinetworking.VirtualService{Hosts: []string{"a.example.com"}, Gateways: []string{"in"},
				Http: []*apinetworking.HTTPRoute{{Route: []*apinetworking.HTTPRouteDestination{{Destination: &apinetworking.Destination{Host: "web.shop.svc.cluster.local"}}}}}}}
		if _, err := istio.NetworkingV1alpha3().VirtualServices("edge").Create(ctx, vs, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
		if w := warned.take(); len(w) > 0 {
			t.Errorf("warnings on a VirtualService: %q", w)
		}
	})

	// The webhook down: the configuration now calls a port nobody listens
	// on, and the failure policy decides.
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	deadURL := fmt.Sprintf("https://%s%s", lis.Addr(), admission.Path)
	lis.Close()
	aps = istio.SecurityV1().AuthorizationPolicies("down")
	for _, fp := range []admissionregistrationv1.FailurePolicyType{admissionregistrationv1.Fail, admissionregistrationv1.Ignore} {
		t.Run("webhook down, failurePolicy "+string(fp), func(t *testing.T) {
			cur, err := vwcs.Get(ctx, vwc.Name, metav1.GetOptions{})
			if err != nil {
				t.Fatal(err)
			}
			cur.Webhooks[0].ClientConfig.URL = &deadURL
			cur.Webhooks[0].FailurePolicy = &fp
			if _, err := vwcs.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
				t.Fatal(err)
			}
			// Wait for the apiserver to call the dead URL.
			waitUntil(t, "the webhook is down", func() bool {
				_, err := aps.Create(ctx, jwtPolicy("down", "probe"), dryRun)
				if fp == admissionregistrationv1.Fail {
					return err != nil && strings.Contains(err.Error(), "failed calling webhook")
				}
				return err == nil
			})
			_, err = aps.Create(ctx, jwtPolicy("down", "jwt"), metav1.CreateOptions{})
			if fp == admissionregistrationv1.Fail {
				if err == nil || !strings.Contains(err.Error(), "failed calling webhook") {
					t.Fatalf("created with the webhook down and failurePolicy Fail: %v", err)
				}
				return
			}
			if err != nil {
				t.Fatalf("refused with the webhook down and failurePolicy Ignore: %v", err)
			}
			if _, err := istio.SecurityV1beta1().AuthorizationPolicies("down").Create(ctx, extPolicy("down", "ext"), metav1.CreateOptions{}); err != nil {
				t.Fatalf("refused with the webhook down and failurePolicy Ignore: %v", err)
			}
		})
	}
	// What got in while the webhook was down, the load refuses, with the
	// message the webhook gave above.
	t.Run("the load refuses what slipped in, as the webhook did", func(t *testing.T) {
		src := &kube.Source{Client: istio, Namespace: "down"}
		wctx, cancel := context.WithCancel(ctx)
		defer cancel()
		done, err := src.Watch(wctx, func() {})
		if err != nil {
			t.Fatal(err)
		}
		defer func() { cancel(); <-done }()
		_, loadErr := src.Policies()
		// The webhook's answers, for the objects as v1, the version the
		// source watches (the v1beta1 object's JSON is the same).
		var want []string
		ext := extPolicy("down", "ext")
		for _, p := range []metav1.Object{jwtPolicy("down", "jwt"), ext} {
			resp, _ := admission.Review(apRequest(t, p), nil)
			if resp.Allowed {
				t.Fatalf("webhook admits %s", p.GetName())
			}
			want = append(want, strings.Split(resp.Result.Message, "\n")...)
		}
		got := strings.Split(fmt.Sprint(loadErr), "\n")
		slices.Sort(got)
		slices.Sort(want)
		if !slices.Equal(got, want) {
			t.Errorf("the load refuses with\n%q\nthe webhook with\n%q", got, want)
		}
	})
}

// apRequest is the AdmissionRequest creating an AuthorizationPolicy, as v1:
// the version the source watches.
func apRequest(t *testing.T, p metav1.Object) *admissionv1.AdmissionRequest {
	t.Helper()
	raw, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	return &admissionv1.AdmissionRequest{
		Kind:      metav1.GroupVersionKind{Group: "security.istio.io", Version: "v1", Kind: "AuthorizationPolicy"},
		Resource:  metav1.GroupVersionResource{Group: "security.istio.io", Version: "v1", Resource: "authorizationpolicies"},
		Name:      p.GetName(),
		Namespace: p.GetNamespace(),
		Operation: admissionv1.Create,
		Object:    runtime.RawExtension{Raw: raw},
	}
}

func waitUntil(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting until %s", what)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
