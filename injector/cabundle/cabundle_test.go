package cabundle_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

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

func TestWebhookPatcher(t *testing.T) {
	cs := kube(t)
	ctx := context.Background()
	auth := authority.New(td, material(t))
	const name = "patcher-test"
	api := cs.AdmissionregistrationV1().MutatingWebhookConfigurations()
	w, err := api.Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + name})
	if err != nil {
		t.Fatal(err)
	}
	defer w.Stop()
	all := func(want string) func(*admissionregistrationv1.MutatingWebhookConfiguration) bool {
		return func(m *admissionregistrationv1.MutatingWebhookConfiguration) bool {
			for _, h := range m.Webhooks {
				if string(h.ClientConfig.CABundle) != want {
					return false
				}
			}
			return true
		}
	}

	p, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{Client: cs, Name: name, Bundle: auth})
	if err != nil {
		t.Fatal(err)
	}
	// Started before the configuration exists, as on a fresh install.
	run(t, p.Run)
	url := "https://127.0.0.1:1/inject"
	none := admissionregistrationv1.SideEffectClassNone
	hook := func(n string) admissionregistrationv1.MutatingWebhook {
		return admissionregistrationv1.MutatingWebhook{
			Name: n, ClientConfig: admissionregistrationv1.WebhookClientConfig{URL: &url},
			SideEffects: &none, AdmissionReviewVersions: []string{"v1"},
		}
	}
	if _, err := api.Create(ctx, &admissionregistrationv1.MutatingWebhookConfiguration{
		ObjectMeta: metav1.ObjectMeta{Name: name},
		Webhooks:   []admissionregistrationv1.MutatingWebhook{hook("a.inject.trustmesh.io"), hook("b.inject.trustmesh.io")},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = api.Delete(context.Background(), name, metav1.DeleteOptions{}) })
	await(t, w, "the first bundle", all(bundlePEM(t, auth)))

	// CA rotation: the new roots reach the webhook configuration.
	auth.Replace(material(t))
	await(t, w, "the rotated bundle", all(bundlePEM(t, auth)))

	// An edit (helm upgrade resetting it) is undone.
	cur, err := api.Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		t.Fatal(err)
	}
	cur.Webhooks[1].ClientConfig.CABundle = nil
	if _, err := api.Update(ctx, cur, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	await(t, w, "the reset bundle restored", func(m *admissionregistrationv1.MutatingWebhookConfiguration) bool {
		return m.ResourceVersion != cur.ResourceVersion && all(bundlePEM(t, auth))(m)
	})
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
