package deploy_test

import (
	"errors"
	"path"
	"slices"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/trustmesh/trustmesh/deploy"
	"github.com/trustmesh/trustmesh/injector"
)

// haValues is a production profile: several replicas sharing a CA from a
// Secret and the journal in PostgreSQL, with every optional part on.
func haValues() map[string]any {
	return map[string]any{
		"replicaCount": 3,
		"ca":           map[string]any{"existingSecret": "cacerts"},
		"journal":      map[string]any{"existingSecret": "trustmesh-journal-dsn"},
		"meshConfig": map[string]any{
			"istioCompatibility": true,
			"capture":            map[string]any{"excludableOutboundCIDRs": []any{"10.96.0.0/12"}, "excludableOutboundPorts": []any{"5432"}},
		},
		"networkPolicy":    map[string]any{"enabled": true, "namespaces": []any{"shop", "bank"}},
		"grafanaDashboard": map[string]any{"enabled": true},
	}
}

func find(objs []*unstructured.Unstructured, kind, name string) *unstructured.Unstructured {
	for _, o := range objs {
		if o.GetKind() == kind && o.GetName() == name {
			return o
		}
	}
	return nil
}

func kinds(objs []*unstructured.Unstructured) map[string]int {
	k := map[string]int{}
	for _, o := range objs {
		k[o.GetKind()]++
	}
	return k
}

func webhookConfig(t *testing.T, objs []*unstructured.Unstructured) *admissionregistrationv1.MutatingWebhookConfiguration {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() == "MutatingWebhookConfiguration" {
			var mwc admissionregistrationv1.MutatingWebhookConfiguration
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &mwc); err != nil {
				t.Fatal(err)
			}
			return &mwc
		}
	}
	t.Fatal("no MutatingWebhookConfiguration")
	return nil
}

// meshConfigOf returns the mesh config the chart renders, as the control
// plane would load it.
func meshConfigOf(t *testing.T, objs []*unstructured.Unstructured) injector.MeshConfig {
	t.Helper()
	cm := find(objs, "ConfigMap", "trustmesh-mesh")
	if cm == nil {
		t.Fatal("no mesh ConfigMap")
	}
	text, _, _ := unstructured.NestedString(cm.Object, "data", "mesh.yaml")
	mesh, err := injector.ParseMeshConfig([]byte(text))
	if err != nil {
		t.Fatal(err)
	}
	return mesh
}

func TestRender(t *testing.T) {
	for _, tc := range []struct {
		name     string
		values   map[string]any
		want     map[string]int
		webhooks []string
		compat   bool
	}{
		{
			name: "defaults",
			want: map[string]int{"CustomResourceDefinition": 5, "Deployment": 3, "PersistentVolumeClaim": 1,
				"PodDisruptionBudget": 3, "MutatingWebhookConfiguration": 1, "Namespace": 1, "NetworkPolicy": 0, "Secret": 0},
			webhooks: []string{"namespace.inject.trustmesh.io"},
		},
		{
			name:   "production",
			values: haValues(),
			want: map[string]int{"CustomResourceDefinition": 5, "Deployment": 3, "PersistentVolumeClaim": 0,
				"NetworkPolicy": 2, "ConfigMap": 2},
			webhooks: []string{"namespace.inject.trustmesh.io", "istio-namespace.inject.trustmesh.io", "istio-object.inject.trustmesh.io"},
			compat:   true,
		},
		{
			name:     "beside Istio, without gateways",
			values:   map[string]any{"crds": map[string]any{"install": false}, "gateways": map[string]any{"ingress": map[string]any{"enabled": false}, "egress": map[string]any{"enabled": false}}},
			want:     map[string]int{"CustomResourceDefinition": 0, "Deployment": 1, "Namespace": 0, "Role": 1},
			webhooks: []string{"namespace.inject.trustmesh.io"},
		},
		{
			name: "no injection",
			values: map[string]any{"injection": map[string]any{"enabled": false},
				"gateways": map[string]any{"ingress": map[string]any{"enabled": false}, "egress": map[string]any{"enabled": false}}},
			want: map[string]int{"MutatingWebhookConfiguration": 0},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := deploy.Render(deploy.RenderOptions{Values: tc.values})
			if err != nil {
				t.Fatal(err)
			}
			got := kinds(objs)
			for k, n := range tc.want {
				if got[k] != n {
					t.Errorf("%d %s, want %d (all: %v)", got[k], k, n, got)
				}
			}
			for _, o := range objs {
				if o.GetName() == "" {
					t.Errorf("a %s has no name", o.GetKind())
				}
			}
			if tc.webhooks != nil {
				mwc := webhookConfig(t, objs)
				var names []string
				for _, w := range mwc.Webhooks {
					names = append(names, w.Name)
					if w.FailurePolicy == nil || *w.FailurePolicy != admissionregistrationv1.Fail {
						t.Errorf("webhook %s does not fail closed", w.Name)
					}
					if w.SideEffects == nil || *w.SideEffects != admissionregistrationv1.SideEffectClassNone {
						t.Errorf("webhook %s has side effects", w.Name)
					}
					if !neverInjects(w, "kube-system", "kube-public", deploy.DefaultNamespace) {
						t.Errorf("webhook %s may be called for system namespaces", w.Name)
					}
				}
				if !slices.Equal(names, tc.webhooks) {
					t.Errorf("webhooks %v, want %v", names, tc.webhooks)
				}
			}
			mesh := meshConfigOf(t, objs)
			inj, err := injector.New(injector.Config{Mesh: mesh})
			if err != nil {
				t.Fatalf("the control plane would refuse the chart's mesh config: %v", err)
			}
			if m := inj.Mesh(); m.IstioCompatibility != tc.compat || m.ControlPlaneNamespace != deploy.DefaultNamespace {
				t.Errorf("mesh config %+v", m)
			}
		})
	}
}

// neverInjects reports whether w's namespace selector excludes every one
// of namespaces by name.
func neverInjects(w admissionregistrationv1.MutatingWebhook, namespaces ...string) bool {
	if w.NamespaceSelector == nil {
		return false
	}
	for _, e := range w.NamespaceSelector.MatchExpressions {
		if e.Key == "kubernetes.io/metadata.name" && e.Operator == "NotIn" {
			for _, ns := range namespaces {
				if !slices.Contains(e.Values, ns) {
					return false
				}
			}
			return true
		}
	}
	return false
}

func TestValuesSchema(t *testing.T) {
	for _, tc := range []struct {
		name   string
		values map[string]any
	}{
		{"unknown field", map[string]any{"replicas": 3}},
		{"several replicas without PostgreSQL", map[string]any{"replicaCount": 2}},
		{"a DSN that is not PostgreSQL", map[string]any{"journal": map[string]any{"dsn": "mysql://db"}}},
		{"a KMS key without certificates", map[string]any{"ca": map[string]any{"keyURI": "awskms:///alias/ca"}}},
		{"pull policy", map[string]any{"image": map[string]any{"pullPolicy": "Sometimes"}}},
		{"privileged gateway port", map[string]any{"gateways": map[string]any{"ingress": map[string]any{
			"service": map[string]any{"type": "LoadBalancer", "ports": []any{map[string]any{"name": "http", "port": 80, "targetPort": 80}}}}}}},
		{"network policy for no namespace", map[string]any{"networkPolicy": map[string]any{"enabled": true}}},
		{"proxy as root", map[string]any{"meshConfig": map[string]any{"proxy": map[string]any{"uid": 0}}}},
		{"exclusion that is not a CIDR", map[string]any{"meshConfig": map[string]any{"capture": map[string]any{"excludableOutboundCIDRs": []any{"10.0.0.1"}}}}},
		{"gateways without the injector that completes them", map[string]any{"injection": map[string]any{"enabled": false}}},
		{"webhook timeout beyond the API server's", map[string]any{"injection": map[string]any{"timeoutSeconds": 60}}},
		{"Rego bundles without a verification key", map[string]any{"authz": map[string]any{"bundles": map[string]any{
			"configMap": "rego", "files": []any{"envoy.tar.gz"}}}}},
		{"Rego bundles without their ConfigMap", map[string]any{"authz": map[string]any{"bundles": map[string]any{
			"files": []any{"envoy.tar.gz"}, "verificationKey": testBundleKey}}}},
		{"a Rego bundle that is not a .tar.gz", map[string]any{"authz": map[string]any{"bundles": map[string]any{
			"configMap": "rego", "files": []any{"../envoy"}, "verificationKey": testBundleKey}}}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := deploy.Render(deploy.RenderOptions{Values: tc.values})
			if !errors.Is(err, deploy.ErrInvalidValues) {
				t.Fatalf("error %v, want ErrInvalidValues", err)
			}
		})
	}
}

const testBundleKey = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n"

// TestRenderRegoBundles checks that signed Rego bundles from a ConfigMap
// reach serve: each file is a --bundle under the mount of that ConfigMap,
// and the verification key is a --bundle-verification-key in the
// ConfigMap the chart renders, so serve (which on Kubernetes refuses
// unsigned bundles) verifies them.
func TestRenderRegoBundles(t *testing.T) {
	objs, err := deploy.Render(deploy.RenderOptions{Values: map[string]any{"authz": map[string]any{"bundles": map[string]any{
		"configMap": "rego", "files": []any{"envoy.tar.gz", "extra.tgz"}, "verificationKey": testBundleKey, "scope": "write",
	}}}})
	if err != nil {
		t.Fatal(err)
	}
	dep := find(objs, "Deployment", "trustmesh")
	if dep == nil {
		t.Fatal("no trustmesh Deployment")
	}
	var d appsv1.Deployment
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(dep.Object, &d); err != nil {
		t.Fatal(err)
	}
	c := d.Spec.Template.Spec.Containers[0]
	mounts := map[string]string{} // mount path -> ConfigMap
	for _, m := range c.VolumeMounts {
		for _, v := range d.Spec.Template.Spec.Volumes {
			if v.Name == m.Name && v.ConfigMap != nil {
				mounts[m.MountPath] = v.ConfigMap.Name
			}
		}
	}
	var bundles []string
	flags := map[string]string{}
	for _, a := range c.Args {
		flag, val, _ := strings.Cut(a, "=")
		if flag == "--bundle" {
			bundles = append(bundles, val)
			continue
		}
		flags[flag] = val
	}
	if want := []string{"/etc/trustmesh-bundles/envoy.tar.gz", "/etc/trustmesh-bundles/extra.tgz"}; !slices.Equal(bundles, want) {
		t.Errorf("--bundle %v, want %v", bundles, want)
	}
	for _, b := range bundles {
		if mounts[path.Dir(b)] != "rego" {
			t.Errorf("--bundle %s is not in the mount of ConfigMap rego (mounts %v)", b, mounts)
		}
	}
	key := flags["--bundle-verification-key"]
	if mounts[path.Dir(key)] != "trustmesh-bundle-key" {
		t.Fatalf("--bundle-verification-key %q is not in the mount of trustmesh-bundle-key (mounts %v)", key, mounts)
	}
	cm := find(objs, "ConfigMap", "trustmesh-bundle-key")
	if cm == nil {
		t.Fatal("no ConfigMap trustmesh-bundle-key")
	}
	if got, _, _ := unstructured.NestedString(cm.Object, "data", path.Base(key)); got != testBundleKey {
		t.Errorf("the key ConfigMap holds %q under %s, want the verification key", got, path.Base(key))
	}
	if flags["--bundle-verification-scope"] != "write" || flags["--bundle-key-algorithm"] != "RS256" {
		t.Errorf("verification flags %v", flags)
	}

	// Without bundles, serve gets no bundle flags and no key ConfigMap.
	objs, err = deploy.Render(deploy.RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if find(objs, "ConfigMap", "trustmesh-bundle-key") != nil {
		t.Error("a key ConfigMap without bundles")
	}
	if err := runtime.DefaultUnstructuredConverter.FromUnstructured(find(objs, "Deployment", "trustmesh").Object, &d); err != nil {
		t.Fatal(err)
	}
	for _, a := range d.Spec.Template.Spec.Containers[0].Args {
		if strings.HasPrefix(a, "--bundle") {
			t.Errorf("%s without bundles", a)
		}
	}
}
