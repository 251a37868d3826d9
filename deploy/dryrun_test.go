package deploy_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/restmapper"

	"github.com/trustmesh/trustmesh/deploy"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// One real kube-apiserver for the package, started by the first test that
// needs it.
var shared kubeapi.Shared

func TestMain(m *testing.M) { shared.Main(m) }

func kube(t *testing.T) *rest.Config {
	t.Helper()
	kubeCfg := shared.Config(t)
	return kubeCfg
}

// applier applies objects with server-side apply and dryRun=All: the API
// server runs defaulting, validation and admission, and stores nothing.
type applier struct {
	dyn    dynamic.Interface
	mapper meta.RESTMapper
}

func newApplier(t *testing.T, cfg *rest.Config) *applier {
	t.Helper()
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return &applier{
		dyn:    dynamic.NewForConfigOrDie(cfg),
		mapper: restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc)),
	}
}

func (a *applier) dryRun(ctx context.Context, obj *unstructured.Unstructured) error {
	gvk := obj.GroupVersionKind()
	m, err := a.mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
	if err != nil {
		return fmt.Errorf("%s: %w", gvk, err)
	}
	var ri dynamic.ResourceInterface = a.dyn.Resource(m.Resource)
	if m.Scope.Name() == meta.RESTScopeNameNamespace {
		if obj.GetNamespace() == "" {
			return fmt.Errorf("namespaced %s %s has no namespace", gvk.Kind, obj.GetName())
		}
		ri = a.dyn.Resource(m.Resource).Namespace(obj.GetNamespace())
	} else if obj.GetNamespace() != "" {
		return fmt.Errorf("cluster-scoped %s %s has a namespace", gvk.Kind, obj.GetName())
	}
	_, err = ri.Apply(ctx, obj.GetName(), obj, metav1.ApplyOptions{FieldManager: "helm", DryRun: []string{metav1.DryRunAll}, Force: true})
	return err
}

func ensureNamespaces(t *testing.T, cs kubernetes.Interface, names ...string) {
	t.Helper()
	for _, n := range names {
		_, err := cs.CoreV1().Namespaces().Create(context.Background(), &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: n}}, metav1.CreateOptions{})
		if err != nil && !apierrors.IsAlreadyExists(err) {
			t.Fatal(err)
		}
	}
}

// TestServerSideDryRun renders the chart in each profile and has the real
// kube-apiserver accept every object, CRDs included, under a server-side
// dry run.
func TestServerSideDryRun(t *testing.T) {
	cfg := kube(t)
	cs := kubernetes.NewForConfigOrDie(cfg)
	a := newApplier(t, cfg)
	ctx := context.Background()
	// A dry run stores nothing, so the namespaces objects go into must
	// exist already, as they do when Helm applies the Namespace first.
	ensureNamespaces(t, cs, deploy.DefaultNamespace, "trustmesh-gateways", "shop", "bank", "mesh-prod", "mesh-gw")

	for _, tc := range []struct {
		name string
		opts deploy.RenderOptions
	}{
		{"defaults", deploy.RenderOptions{}},
		{"production", deploy.RenderOptions{Values: haValues()}},
		{"ambient", deploy.RenderOptions{Values: ambientValues()}},
		{"another namespace", deploy.RenderOptions{Namespace: "mesh-prod", ReleaseName: "mesh", Values: map[string]any{
			"trustDomain": "prod.example.org",
			"journal":     map[string]any{"dsn": "postgres://trustmesh@db.example.org/trustmesh?sslmode=verify-full"},
			"gateways":    map[string]any{"namespace": "mesh-gw", "createNamespace": false},
			"persistence": map[string]any{"enabled": false},
		}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := deploy.Render(tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			for _, obj := range objs {
				if err := a.dryRun(ctx, obj); err != nil {
					t.Errorf("%s %s/%s refused: %v", obj.GetKind(), obj.GetNamespace(), obj.GetName(), err)
				}
			}
			t.Logf("%d objects accepted", len(objs))
		})
	}

	// The dry run does validate: a broken object is refused.
	t.Run("refuses a broken object", func(t *testing.T) {
		objs, err := deploy.Render(deploy.RenderOptions{})
		if err != nil {
			t.Fatal(err)
		}
		for _, obj := range objs {
			if obj.GetKind() != "MutatingWebhookConfiguration" {
				continue
			}
			hooks, _, _ := unstructured.NestedSlice(obj.Object, "webhooks")
			hooks[0].(map[string]any)["failurePolicy"] = "Sometimes"
			if err := unstructured.SetNestedSlice(obj.Object, hooks, "webhooks"); err != nil {
				t.Fatal(err)
			}
			if err := a.dryRun(ctx, obj); !apierrors.IsInvalid(err) {
				t.Fatalf("error %v, want Invalid", err)
			}
			return
		}
		t.Fatal("no MutatingWebhookConfiguration")
	})
}

// waitWatch reads w until done holds, or fails after 30s.
func waitWatch(t *testing.T, w watch.Interface, done func(runtime.Object) bool) {
	t.Helper()
	defer w.Stop()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatal("watch closed")
			}
			if done(ev.Object) {
				return
			}
		case <-timeout:
			t.Fatal("timed out")
		}
	}
}
