package deploy_test

import (
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"

	"github.com/trustmesh/trustmesh/deploy"
)

// renderUI renders the chart and returns the serve container, the pod's
// volumes and the trustmesh-ui Service, if any.
func renderUI(t *testing.T, values map[string]any) (*corev1.Container, []corev1.Volume, *corev1.Service) {
	t.Helper()
	objs, err := deploy.Render(deploy.RenderOptions{Values: values})
	if err != nil {
		t.Fatal(err)
	}
	var dep appsv1.Deployment
	var svc *corev1.Service
	for _, o := range objs {
		switch {
		case o.GetKind() == "Deployment" && o.GetName() == "trustmesh":
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &dep); err != nil {
				t.Fatal(err)
			}
		case o.GetKind() == "Service" && o.GetName() == "trustmesh-ui":
			svc = &corev1.Service{}
			if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, svc); err != nil {
				t.Fatal(err)
			}
		}
	}
	for i, c := range dep.Spec.Template.Spec.Containers {
		if len(c.Args) > 0 && c.Args[0] == "serve" {
			return &dep.Spec.Template.Spec.Containers[i], dep.Spec.Template.Spec.Volumes, svc
		}
	}
	t.Fatal("no serve container")
	return nil, nil, nil
}

// TestUIOffByDefault: the chart turns serve's web UI off (its default is
// loopback, out of anyone's reach in a pod anyway) and makes no Service.
func TestUIOffByDefault(t *testing.T) {
	serve, _, svc := renderUI(t, nil)
	if !slices.Contains(serve.Args, "--listen-ui=off") || svc != nil {
		t.Fatalf("defaults: args %v, ui Service %v; want --listen-ui=off and no Service", serve.Args, svc)
	}
}

// TestUIEnabled: on, the UI listens off loopback behind its own Service,
// with the token from the Secret and the Service's names allowed as Host.
func TestUIEnabled(t *testing.T) {
	serve, vols, svc := renderUI(t, map[string]any{"ui": map[string]any{"enabled": true, "tokenSecret": "my-ui", "allowedHosts": []any{"mesh.example.com"}}})
	args := strings.Join(serve.Args, " ")
	for _, want := range []string{"--listen-ui=:15018", "--ui-token-file=/etc/trustmesh-ui/token",
		"--ui-allowed-host=trustmesh-ui.trustmesh-system.svc", "--ui-allowed-host=mesh.example.com"} {
		if !strings.Contains(args, want) {
			t.Errorf("args lack %s: %s", want, args)
		}
	}
	if svc == nil || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.StrVal != "ui" {
		t.Fatalf("ui Service = %+v", svc)
	}
	port := false
	for _, p := range serve.Ports {
		port = port || p.Name == "ui" && p.ContainerPort == 15018
	}
	mounted := false
	for _, m := range serve.VolumeMounts {
		mounted = mounted || m.Name == "ui-token" && m.MountPath == "/etc/trustmesh-ui"
	}
	secret := false
	for _, v := range vols {
		secret = secret || v.Name == "ui-token" && v.Secret != nil && v.Secret.SecretName == "my-ui" && len(v.Secret.Items) == 1 && v.Secret.Items[0].Path == "token"
	}
	if !port || !mounted || !secret {
		t.Errorf("container port ui %v, token mounted %v, from Secret my-ui %v", port, mounted, secret)
	}
}
