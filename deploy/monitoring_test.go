package deploy_test

import (
	"slices"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/trustmesh/trustmesh/deploy"
)

// TestDebugEndpointsOffByDefault: the chart's monitoring port is reachable
// from every pod through the Service, so serve runs with its debug endpoints
// (the xDS clients: every meshed pod's name, IP and SPIFFE ID) off unless
// monitoring.debugEndpoints turns them on.
func TestDebugEndpointsOffByDefault(t *testing.T) {
	for _, tc := range []struct {
		name   string
		values map[string]any
		want   string
	}{
		{"defaults", nil, "--debug-endpoints=false"},
		{"production", haValues(), "--debug-endpoints=false"},
		{"turned on", map[string]any{"monitoring": map[string]any{"debugEndpoints": true}}, "--debug-endpoints=true"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := deploy.Render(deploy.RenderOptions{Values: tc.values})
			if err != nil {
				t.Fatal(err)
			}
			o := find(objs, "Deployment", "trustmesh")
			if o == nil {
				t.Fatal("no trustmesh Deployment")
			}
			var dep appsv1.Deployment
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &dep); err != nil {
				t.Fatal(err)
			}
			var args []string
			for _, c := range dep.Spec.Template.Spec.Containers {
				if len(c.Args) > 0 && c.Args[0] == "serve" {
					args = c.Args
				}
			}
			if !slices.Contains(args, tc.want) {
				t.Errorf("serve args %v lack %s", args, tc.want)
			}
		})
	}
	if _, err := deploy.Render(deploy.RenderOptions{Values: map[string]any{"monitoring": map[string]any{"debugEndpoints": "yes"}}}); err == nil {
		t.Error("monitoring.debugEndpoints: \"yes\" was accepted; want the schema to refuse a non-boolean")
	}
}
