package injector_test

import (
	"fmt"
	"testing"

	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/mesh/kube"
)

// TestMeshReadsDataPlaneModeAsTheInjector: the mesh model (mesh/kube),
// which tells the node proxy what to capture, copies the injector's label
// names because the model knows none of its consumers; here the two read
// every combination of pod and namespace labels alike: the injector skips
// exactly the pods the model calls ambient, and a pod it gives a sidecar
// is a sidecar to the model, even in a namespace turned ambient since.
func TestMeshReadsDataPlaneModeAsTheInjector(t *testing.T) {
	for _, c := range [][2]string{
		{injector.LabelDataplaneMode, kube.LabelDataplaneMode},
		{injector.IstioLabelDataplaneMode, kube.IstioLabelDataplaneMode},
		{injector.DataplaneModeAmbient, kube.DataplaneModeAmbient},
		{injector.DataplaneModeNone, kube.DataplaneModeNone},
		{injector.LabelProxy, kube.LabelProxy},
	} {
		if c[0] != c[1] {
			t.Errorf("the injector's %q is the model's %q", c[0], c[1])
		}
	}
	namespaces := map[string]map[string]string{
		"plain":       {injector.LabelInjection: "enabled"},
		"istio":       {injector.LabelInjection: "enabled", injector.IstioLabelDataplaneMode: "ambient"},
		"ours":        {injector.LabelInjection: "enabled", injector.LabelDataplaneMode: "ambient"},
		"none":        {injector.LabelInjection: "enabled", injector.IstioLabelDataplaneMode: "none"},
		"kube-system": {injector.LabelInjection: "enabled", injector.IstioLabelDataplaneMode: "ambient"},
	}
	inj := ambientInjectorWith(t, namespaces)
	values := []string{"", "ambient", "none", "other"}
	for ns := range namespaces {
		for _, ours := range values {
			for _, istio := range values {
				t.Run(fmt.Sprintf("%s/%q/%q", ns, ours, istio), func(t *testing.T) {
					p := basePod()
					p.Namespace = ns
					if ours != "" {
						p.Labels[injector.LabelDataplaneMode] = ours
					}
					if istio != "" {
						p.Labels[injector.IstioLabelDataplaneMode] = istio
					}
					model := kube.DataPlaneMode(p, namespaces[ns])
					res, err := inj.InjectPod(ns, &p.ObjectMeta, &p.Spec)
					if err != nil {
						t.Fatal(err)
					}
					if skipped := res.Skipped == injector.SkipAmbient; skipped != (model == mesh.DataPlaneAmbient) {
						t.Fatalf("the injector skips it as ambient: %t; the model's mode is %q", skipped, model)
					}
					if res.Injected && res.Template == injector.TemplateSidecar {
						// Injected pods keep their labels, and the namespace
						// may turn ambient afterwards.
						for _, later := range []map[string]string{namespaces[ns], namespaces["istio"]} {
							if got := kube.DataPlaneMode(p, later); got != mesh.DataPlaneSidecar {
								t.Fatalf("the injected pod is %q to the model, want sidecar", got)
							}
						}
					}
				})
			}
		}
	}
}

func ambientInjectorWith(t *testing.T, ns map[string]map[string]string) *injector.Injector {
	t.Helper()
	mc, err := injector.LoadMeshConfig("testdata/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	inj, err := injector.New(injector.Config{Mesh: mc, Namespaces: namespaceLabels(ns)})
	if err != nil {
		t.Fatal(err)
	}
	return inj
}
