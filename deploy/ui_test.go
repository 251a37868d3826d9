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
		// Every name a client in the cluster may use for the Service.
		"--ui-allowed-host=trustmesh-ui:15018", "--ui-allowed-host=trustmesh-ui.trustmesh-system:15018",
		"--ui-allowed-host=trustmesh-ui.trustmesh-system.svc", "--ui-allowed-host=trustmesh-ui.trustmesh-system.svc.cluster.local",
		"--ui-allowed-host=mesh.example.com",
		// No TLS Secret: plain HTTP, said explicitly.
		"--ui-insecure-http"} {
		if !slices.Contains(serve.Args, want) {
			t.Errorf("args lack %s: %s", want, args)
		}
	}
	if strings.Contains(args, "--ui-tls-") {
		t.Errorf("TLS flags without ui.tls.secretName: %s", args)
	}
	if svc == nil || len(svc.Spec.Ports) != 1 || svc.Spec.Ports[0].TargetPort.StrVal != "ui" {
		t.Fatalf("ui Service = %+v", svc)
	}
	// Sessions live in one replica's memory.
	if svc.Spec.SessionAffinity != corev1.ServiceAffinityClientIP {
		t.Errorf("ui Service sessionAffinity %q, want ClientIP", svc.Spec.SessionAffinity)
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
		// serve refuses a token file group or others may read (kubelet
		// adds only the pod's fsGroup's g+r, which it accepts).
		secret = secret || v.Name == "ui-token" && v.Secret != nil && v.Secret.SecretName == "my-ui" && len(v.Secret.Items) == 1 && v.Secret.Items[0].Path == "token" &&
			v.Secret.DefaultMode != nil && *v.Secret.DefaultMode == 0o400
	}
	if !port || !mounted || !secret {
		t.Errorf("container port ui %v, token mounted %v, from Secret my-ui %v", port, mounted, secret)
	}
}

// TestUITLS: with ui.tls.secretName the UI serves HTTPS from that
// kubernetes.io/tls Secret (mounted 0400) and --ui-insecure-http is gone;
// NOTES.txt warns of the clear-text token only without it.
func TestUITLS(t *testing.T) {
	on := map[string]any{"enabled": true, "tls": map[string]any{"secretName": "ui-cert"}}
	serve, vols, _ := renderUI(t, map[string]any{"ui": on})
	for _, want := range []string{"--ui-tls-cert=/etc/trustmesh-ui-tls/tls.crt", "--ui-tls-key=/etc/trustmesh-ui-tls/tls.key"} {
		if !slices.Contains(serve.Args, want) {
			t.Errorf("args lack %s: %v", want, serve.Args)
		}
	}
	if slices.Contains(serve.Args, "--ui-insecure-http") {
		t.Errorf("--ui-insecure-http with a TLS Secret: %v", serve.Args)
	}
	mounted, secret := false, false
	for _, m := range serve.VolumeMounts {
		mounted = mounted || m.Name == "ui-tls" && m.MountPath == "/etc/trustmesh-ui-tls" && m.ReadOnly
	}
	for _, v := range vols {
		secret = secret || v.Name == "ui-tls" && v.Secret != nil && v.Secret.SecretName == "ui-cert" && v.Secret.DefaultMode != nil && *v.Secret.DefaultMode == 0o400
	}
	if !mounted || !secret {
		t.Errorf("TLS Secret mounted %v, volume from ui-cert with mode 0400 %v", mounted, secret)
	}
	for _, c := range []struct {
		ui   map[string]any
		warn bool
	}{{on, false}, {map[string]any{"enabled": true}, true}, {map[string]any{"enabled": false}, false}} {
		notes, err := deploy.Notes(deploy.RenderOptions{Values: map[string]any{"ui": c.ui}})
		if err != nil {
			t.Fatal(err)
		}
		if got := strings.Contains(notes, "cross the cluster network in clear") && strings.Contains(notes, "port-forward svc/trustmesh-ui 15018"); got != c.warn {
			t.Errorf("ui %v: NOTES.txt warns of the clear-text token: %v, want %v:\n%s", c.ui, got, c.warn, notes)
		}
	}
}
