package cabundle_test

import (
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	admissionv1 "k8s.io/api/admission/v1"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/dynamic"
	dynamicfake "k8s.io/client-go/dynamic/fake"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/injector/cabundle"
	supervisor "github.com/trustmesh/trustmesh/internal/run"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// One real kube-apiserver for the package, started by the first test that
// needs it.
var shared kubeapi.Shared

func TestMain(m *testing.M) { shared.Main(m) }

func kube(t *testing.T) kubernetes.Interface {
	t.Helper()
	kubeCfg := shared.Config(t)
	return kubernetes.NewForConfigOrDie(kubeCfg)
}

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// material makes fresh self-managed CA material: a new root each call.
func material(t *testing.T) *authority.Material {
	t.Helper()
	m, err := authority.Generate(context.Background(), td, time.Now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	return m
}

func bundlePEM(t *testing.T, a *authority.Authority) string {
	t.Helper()
	b, _ := a.Bundle()
	p, err := cabundle.PEM(b)
	if err != nil {
		t.Fatal(err)
	}
	return string(p)
}

func run(t *testing.T, fn func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	})
}

// await reads w until ok holds for an object of type T.
func await[T runtime.Object](t *testing.T, w watch.Interface, what string, ok func(T) bool) {
	t.Helper()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case ev, open := <-w.ResultChan():
			if !open {
				t.Fatalf("watch closed waiting for %s", what)
			}
			if obj, isT := ev.Object.(T); isT && ev.Type != watch.Deleted && ok(obj) {
				return
			}
		case <-timeout:
			t.Fatalf("timed out waiting for %s", what)
		}
	}
}

// webhookAPI is the client of one kind of webhook configuration, seen as
// the test needs it: each webhook's caBundle and failurePolicy.
type webhookAPI struct {
	kind   cabundle.Kind
	watch  func(ctx context.Context, name string) (watch.Interface, error)
	create func(ctx context.Context, name, url string, hooks []string, policy admissionregistrationv1.FailurePolicyType, selector *metav1.LabelSelector) error
	// state returns every webhook's caBundle and failurePolicy.
	state func(obj runtime.Object) (bundles, policies []string, ok bool)
	get   func(ctx context.Context, name string) (runtime.Object, string, error)
	// clearBundle empties the second webhook's caBundle, as a helm upgrade
	// does, and returns the new resourceVersion.
	clearBundle func(ctx context.Context, name string) (string, error)
	delete      func(ctx context.Context, name string) error
}

func apis(cs kubernetes.Interface) []webhookAPI {
	none := admissionregistrationv1.SideEffectClassNone
	timeout := int32(2)
	clientConfig := func(url string) admissionregistrationv1.WebhookClientConfig {
		return admissionregistrationv1.WebhookClientConfig{URL: &url}
	}
	mut := cs.AdmissionregistrationV1().MutatingWebhookConfigurations()
	val := cs.AdmissionregistrationV1().ValidatingWebhookConfigurations()
	byName := func(name string) metav1.ListOptions {
		return metav1.ListOptions{FieldSelector: "metadata.name=" + name}
	}
	policyOf := func(p *admissionregistrationv1.FailurePolicyType) string {
		if p == nil {
			return ""
		}
		return string(*p)
	}
	return []webhookAPI{{
		kind:  cabundle.Mutating,
		watch: func(ctx context.Context, name string) (watch.Interface, error) { return mut.Watch(ctx, byName(name)) },
		create: func(ctx context.Context, name, url string, hooks []string, policy admissionregistrationv1.FailurePolicyType, selector *metav1.LabelSelector) error {
			c := &admissionregistrationv1.MutatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: name}}
			for _, h := range hooks {
				c.Webhooks = append(c.Webhooks, admissionregistrationv1.MutatingWebhook{
					Name: h, ClientConfig: clientConfig(url), SideEffects: &none, AdmissionReviewVersions: []string{"v1"},
					FailurePolicy: &policy, ObjectSelector: selector, TimeoutSeconds: &timeout,
				})
			}
			_, err := mut.Create(ctx, c, metav1.CreateOptions{})
			return err
		},
		state: func(obj runtime.Object) (bundles, policies []string, ok bool) {
			m, ok := obj.(*admissionregistrationv1.MutatingWebhookConfiguration)
			if !ok {
				return nil, nil, false
			}
			for _, h := range m.Webhooks {
				bundles, policies = append(bundles, string(h.ClientConfig.CABundle)), append(policies, policyOf(h.FailurePolicy))
			}
			return bundles, policies, true
		},
		get: func(ctx context.Context, name string) (runtime.Object, string, error) {
			m, err := mut.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return nil, "", err
			}
			return m, m.ResourceVersion, nil
		},
		clearBundle: func(ctx context.Context, name string) (string, error) {
			m, err := mut.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return "", err
			}
			m.Webhooks[1].ClientConfig.CABundle = nil
			m, err = mut.Update(ctx, m, metav1.UpdateOptions{})
			if err != nil {
				return "", err
			}
			return m.ResourceVersion, nil
		},
		delete: func(ctx context.Context, name string) error { return mut.Delete(ctx, name, metav1.DeleteOptions{}) },
	}, {
		kind:  cabundle.Validating,
		watch: func(ctx context.Context, name string) (watch.Interface, error) { return val.Watch(ctx, byName(name)) },
		create: func(ctx context.Context, name, url string, hooks []string, policy admissionregistrationv1.FailurePolicyType, selector *metav1.LabelSelector) error {
			c := &admissionregistrationv1.ValidatingWebhookConfiguration{ObjectMeta: metav1.ObjectMeta{Name: name}}
			for _, h := range hooks {
				c.Webhooks = append(c.Webhooks, admissionregistrationv1.ValidatingWebhook{
					Name: h, ClientConfig: clientConfig(url), SideEffects: &none, AdmissionReviewVersions: []string{"v1"},
					FailurePolicy: &policy, ObjectSelector: selector, TimeoutSeconds: &timeout,
					Rules: []admissionregistrationv1.RuleWithOperations{{
						Operations: []admissionregistrationv1.OperationType{admissionregistrationv1.Create},
						Rule:       admissionregistrationv1.Rule{APIGroups: []string{""}, APIVersions: []string{"v1"}, Resources: []string{"configmaps"}},
					}},
				})
			}
			_, err := val.Create(ctx, c, metav1.CreateOptions{})
			return err
		},
		state: func(obj runtime.Object) (bundles, policies []string, ok bool) {
			m, ok := obj.(*admissionregistrationv1.ValidatingWebhookConfiguration)
			if !ok {
				return nil, nil, false
			}
			for _, h := range m.Webhooks {
				bundles, policies = append(bundles, string(h.ClientConfig.CABundle)), append(policies, policyOf(h.FailurePolicy))
			}
			return bundles, policies, true
		},
		get: func(ctx context.Context, name string) (runtime.Object, string, error) {
			m, err := val.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return nil, "", err
			}
			return m, m.ResourceVersion, nil
		},
		clearBundle: func(ctx context.Context, name string) (string, error) {
			m, err := val.Get(ctx, name, metav1.GetOptions{})
			if err != nil {
				return "", err
			}
			m.Webhooks[1].ClientConfig.CABundle = nil
			m, err = val.Update(ctx, m, metav1.UpdateOptions{})
			if err != nil {
				return "", err
			}
			return m.ResourceVersion, nil
		},
		delete: func(ctx context.Context, name string) error { return val.Delete(ctx, name, metav1.DeleteOptions{}) },
	}}
}

// awaitState reads w until every webhook's caBundle is bundle and, unless
// policy is empty, every failurePolicy is policy.
func awaitState(t *testing.T, api webhookAPI, w watch.Interface, what, bundle, policy string, also func(runtime.Object) bool) {
	t.Helper()
	await(t, w, what, func(obj runtime.Object) bool {
		bundles, policies, ok := api.state(obj)
		if !ok || (also != nil && !also(obj)) {
			return false
		}
		for i := range bundles {
			if bundles[i] != bundle || (policy != "" && policies[i] != policy) {
				return false
			}
		}
		return true
	})
}

// The caBundle of either kind of webhook configuration follows the CA
// across rotation, and an edit is undone.
func TestWebhookPatcher(t *testing.T) {
	cs := kube(t)
	for _, api := range apis(cs) {
		t.Run(api.kind.String(), func(t *testing.T) {
			ctx := context.Background()
			auth := authority.New(td, material(t))
			name := "patcher-test-" + strings.ToLower(api.kind.String())
			w, err := api.watch(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Stop()

			p, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{Client: cs, Kind: api.kind, Name: name, Bundle: auth})
			if err != nil {
				t.Fatal(err)
			}
			// Started before the configuration exists, as on a fresh install.
			run(t, p.Run)
			if err := api.create(ctx, name, "https://127.0.0.1:1/x", []string{"a.test.trustmesh.io", "b.test.trustmesh.io"}, admissionregistrationv1.Ignore, nil); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = api.delete(context.Background(), name) })
			// Without FailClose the failure policy is left alone.
			awaitState(t, api, w, "the first bundle", bundlePEM(t, auth), string(admissionregistrationv1.Ignore), nil)

			// CA rotation: the new roots reach the webhook configuration.
			auth.Replace(material(t))
			awaitState(t, api, w, "the rotated bundle", bundlePEM(t, auth), string(admissionregistrationv1.Ignore), nil)

			// An edit (helm upgrade resetting it) is undone.
			rv, err := api.clearBundle(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			awaitState(t, api, w, "the reset bundle restored", bundlePEM(t, auth), "", func(obj runtime.Object) bool {
				m, _ := obj.(metav1.Object)
				return m.GetResourceVersion() != rv
			})
		})
	}
}

// staticBundle is a bundle source holding one root, never replaced.
type staticBundle struct{ b *spiffebundle.Bundle }

func (s staticBundle) Bundle() (*spiffebundle.Bundle, <-chan struct{}) { return s.b, nil }

// logSink is a slog handler that sends each warning's message and error to
// a channel.
type logSink chan string

func (s logSink) Enabled(_ context.Context, l slog.Level) bool { return l >= slog.LevelWarn }
func (s logSink) Handle(_ context.Context, r slog.Record) error {
	msg := r.Message
	r.Attrs(func(a slog.Attr) bool {
		if a.Key == "error" {
			msg += ": " + a.Value.String()
		}
		return true
	})
	select {
	case s <- msg:
	default:
	}
	return nil
}
func (s logSink) WithAttrs([]slog.Attr) slog.Handler { return s }
func (s logSink) WithGroup(string) slog.Handler      { return s }

// FailClose switches a validating webhook from Ignore to Fail only once it
// is seen denying the probe over TLS with the caBundle in place: a webhook
// that admits the probe, or never answers, stays Ignore, and the reason is
// logged.
func TestFailClose(t *testing.T) {
	cs := kube(t)
	dyn := dynamic.NewForConfigOrDie(shared.Config(t))
	deny := func(w http.ResponseWriter, r *http.Request) {
		var review admissionv1.AdmissionReview
		if err := json.NewDecoder(r.Body).Decode(&review); err != nil || review.Request == nil {
			http.Error(w, "bad review", http.StatusBadRequest)
			return
		}
		// Quote the token, as the control plane's own webhook does.
		var obj unstructured.Unstructured
		_ = obj.UnmarshalJSON(review.Request.Object.Raw)
		msg := "probe " + obj.GetAnnotations()[probeAnnotation] + " refused"
		review.Response = &admissionv1.AdmissionResponse{UID: review.Request.UID, Allowed: false, Result: &metav1.Status{Message: msg}}
		review.Request = nil
		_ = json.NewEncoder(w).Encode(review)
	}
	allow := func(w http.ResponseWriter, r *http.Request) {
		var review admissionv1.AdmissionReview
		if err := json.NewDecoder(r.Body).Decode(&review); err != nil || review.Request == nil {
			http.Error(w, "bad review", http.StatusBadRequest)
			return
		}
		review.Response = &admissionv1.AdmissionResponse{UID: review.Request.UID, Allowed: true}
		review.Request = nil
		_ = json.NewEncoder(w).Encode(review)
	}
	// stop ends the silent handler's requests, which the API server may
	// leave open past its timeout.
	stop := make(chan struct{})
	silent := func(_ http.ResponseWriter, r *http.Request) {
		select {
		case <-r.Context().Done():
		case <-stop:
		}
	}
	unblock := sync.OnceFunc(func() { close(stop) })
	t.Cleanup(unblock)
	for _, tc := range []struct {
		name    string
		handler http.HandlerFunc
		want    admissionregistrationv1.FailurePolicyType
	}{
		{"denies", deny, admissionregistrationv1.Fail},
		{"admits", allow, admissionregistrationv1.Ignore},
		{"never answers", silent, admissionregistrationv1.Ignore},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx := context.Background()
			srv := httptest.NewTLSServer(tc.handler)
			t.Cleanup(srv.Close)
			t.Cleanup(unblock) // before Close, which waits for handlers
			b := spiffebundle.New(td)
			b.AddX509Authority(srv.Certificate())
			bundle := staticBundle{b}
			pem, err := cabundle.PEM(b)
			if err != nil {
				t.Fatal(err)
			}
			name := "failclose-" + strings.ReplaceAll(tc.name, " ", "-")
			api := apis(cs)[1]
			w, err := api.watch(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Stop()
			selector := &metav1.LabelSelector{MatchLabels: map[string]string{"probe": name}}
			if err := api.create(ctx, name, srv.URL+"/validate", []string{"a.validate.trustmesh.io", "b.validate.trustmesh.io"}, admissionregistrationv1.Ignore, selector); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = api.delete(context.Background(), name) })

			probe := &unstructured.Unstructured{}
			probe.SetAPIVersion("v1")
			probe.SetKind("ConfigMap")
			probe.SetName("probe")
			probe.SetNamespace("default")
			probe.SetLabels(map[string]string{"probe": name})
			probe.SetAnnotations(map[string]string{probeAnnotation: probeToken})
			logs := make(logSink, 100)
			p, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{
				Client: cs, Kind: cabundle.Validating, Name: name, Bundle: bundle,
				FailClose: &cabundle.Probe{Client: dyn, Resource: schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}, Object: probe, Token: probeToken},
				Log:       slog.New(logs),
			})
			if err != nil {
				t.Fatal(err)
			}
			run(t, p.Run)
			if tc.want == admissionregistrationv1.Fail {
				awaitState(t, api, w, "failurePolicy Fail", string(pem), string(admissionregistrationv1.Fail), nil)
				return
			}
			// The caBundle is published, then the probe fails, is logged
			// with its reason, and is retried: the policy stays Ignore.
			awaitState(t, api, w, "the bundle", string(pem), string(admissionregistrationv1.Ignore), nil)
			for failures := 0; failures < 2; {
				select {
				case msg := <-logs:
					if strings.Contains(msg, "failurePolicy stays Ignore") && strings.Contains(msg, "was admitted") {
						failures++
					}
				case <-time.After(30 * time.Second):
					t.Fatal("timed out waiting for the probe's failures to be logged")
				}
			}
			obj, _, err := api.get(ctx, name)
			if err != nil {
				t.Fatal(err)
			}
			if _, policies, _ := api.state(obj); !slices.Equal(policies, []string{"Ignore", "Ignore"}) {
				t.Errorf("failurePolicy = %v after failed probes, want Ignore", policies)
			}
			if _, err := cs.CoreV1().ConfigMaps("default").Get(ctx, "probe", metav1.GetOptions{}); err == nil {
				t.Error("the dry-run probe was stored")
			}
		})
	}
}

func TestRootCertPublisher(t *testing.T) {
	cs := kube(t)
	ctx := context.Background()
	auth := authority.New(td, material(t))
	for _, ns := range []string{"alpha", "beta"} {
		if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: ns}}, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	w, err := cs.CoreV1().ConfigMaps("").Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + injector.RootCertConfigMap})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	seen := map[string]string{}
	// awaitAll waits until every namespace in nss holds want.
	awaitAll := func(what, want string, nss ...string) {
		t.Helper()
		await(t, w, what, func(cm *corev1.ConfigMap) bool {
			seen[cm.Namespace] = cm.Data[injector.RootCertKey]
			for _, ns := range nss {
				if seen[ns] != want {
					return false
				}
			}
			return true
		})
	}

	p, err := cabundle.NewRootCertPublisher(cabundle.RootCertConfig{Client: cs, Bundle: auth})
	if err != nil {
		t.Fatal(err)
	}
	run(t, p.Run)
	awaitAll("the bundle in every namespace", bundlePEM(t, auth), "alpha", "beta", "default")

	if _, err := cs.CoreV1().ConfigMaps("kube-system").Get(ctx, injector.RootCertConfigMap, metav1.GetOptions{}); err == nil {
		t.Error("published to kube-system")
	}

	// A new namespace gets it.
	if _, err := cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "gamma"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	awaitAll("the bundle in a new namespace", bundlePEM(t, auth), "gamma")

	// Rotation reaches every namespace.
	auth.Replace(material(t))
	awaitAll("the rotated bundle", bundlePEM(t, auth), "alpha", "beta", "gamma", "default")

	// Deleted or edited, it comes back.
	if err := cs.CoreV1().ConfigMaps("alpha").Delete(ctx, injector.RootCertConfigMap, metav1.DeleteOptions{}); err != nil {
		t.Fatal(err)
	}
	delete(seen, "alpha")
	awaitAll("the deleted ConfigMap recreated", bundlePEM(t, auth), "alpha")
	cm, err := cs.CoreV1().ConfigMaps("beta").Get(ctx, injector.RootCertConfigMap, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cm.Data[injector.RootCertKey] = "-----BEGIN CERTIFICATE-----\nforged\n-----END CERTIFICATE-----\n"
	if _, err := cs.CoreV1().ConfigMaps("beta").Update(ctx, cm, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	awaitAll("the edited ConfigMap restored", bundlePEM(t, auth), "beta")
}

// panicBundle is a bundle source with a bug: it panics.
type panicBundle struct{}

func (panicBundle) Bundle() (*spiffebundle.Bundle, <-chan struct{}) { panic("no bundle") }

// A panic in the loop ends Run with an error, and the informers stop,
// instead of the panic killing the process.
func TestPanicEndsRun(t *testing.T) {
	p, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{Client: kube(t), Name: "panic-test", Bundle: panicBundle{}})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	err = p.Run(ctx)
	var pe *supervisor.PanicError
	if !errors.As(err, &pe) || pe.Value != "no bundle" {
		t.Fatalf("Run = %v, want the bundle source's panic", err)
	}
}

func TestConfigRefused(t *testing.T) {
	if _, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{}); err == nil {
		t.Error("a patcher without a client, name or bundle was accepted")
	}
	if _, err := cabundle.NewRootCertPublisher(cabundle.RootCertConfig{}); err == nil {
		t.Error("a publisher without a client or bundle was accepted")
	}
}

// A FailClose probe without a token could be answered by any webhook.
func TestProbeNeedsToken(t *testing.T) {
	_, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{
		Client: fake.NewClientset(), Kind: cabundle.Validating, Name: "v", Bundle: staticBundle{spiffebundle.New(td)},
		FailClose: &cabundle.Probe{Client: dynamicfake.NewSimpleDynamicClient(runtime.NewScheme()), Resource: schema.GroupVersionResource{Version: "v1", Resource: "configmaps"}, Object: &unstructured.Unstructured{}},
	})
	if err == nil || !strings.Contains(err.Error(), "Token") {
		t.Errorf("NewWebhookPatcher with a tokenless probe = %v, want refused", err)
	}
}
