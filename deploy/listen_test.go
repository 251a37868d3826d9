package deploy_test

import (
	"net"
	"strconv"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/trustmesh/trustmesh/deploy"
)

// TestEveryPortThePodServesIsListenedOnOffLoopback checks the chart against
// serve's workstation defaults, which listen on loopback only: every port
// that the Service routes to and the probes call must be one the serve
// container is told, by a --listen-* flag, to listen on at an address other
// pods (and the kubelet) reach.
func TestEveryPortThePodServesIsListenedOnOffLoopback(t *testing.T) {
	for name, values := range map[string]map[string]any{
		"defaults":   nil,
		"production": haValues(),
		"no injection": {"injection": map[string]any{"enabled": false},
			"gateways": map[string]any{"ingress": map[string]any{"enabled": false}, "egress": map[string]any{"enabled": false}}},
	} {
		t.Run(name, func(t *testing.T) {
			objs, err := deploy.Render(deploy.RenderOptions{Values: values})
			if err != nil {
				t.Fatal(err)
			}
			var dep appsv1.Deployment
			var svc corev1.Service
			for _, o := range objs {
				switch {
				case o.GetKind() == "Deployment" && o.GetName() == "trustmesh":
					if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &dep); err != nil {
						t.Fatal(err)
					}
				case o.GetKind() == "Service" && o.GetName() == "trustmesh":
					if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &svc); err != nil {
						t.Fatal(err)
					}
				}
			}
			var serve *corev1.Container
			for i, c := range dep.Spec.Template.Spec.Containers {
				if len(c.Args) > 0 && c.Args[0] == "serve" {
					serve = &dep.Spec.Template.Spec.Containers[i]
				}
			}
			if serve == nil || len(svc.Spec.Ports) == 0 {
				t.Fatal("no trustmesh Deployment running serve, or no trustmesh Service")
			}
			// The ports serve listens on off loopback, by flag.
			listened := map[int32]string{}
			set := map[string]bool{}
			for _, a := range serve.Args {
				flag, addr, ok := strings.Cut(a, "=")
				if !ok || !strings.HasPrefix(flag, "--listen-") {
					continue
				}
				set[flag] = true
				if addr == "off" {
					continue
				}
				host, port, err := net.SplitHostPort(addr)
				if err != nil {
					t.Errorf("%s: %v", a, err)
					continue
				}
				if host == "localhost" || net.ParseIP(host) != nil && net.ParseIP(host).IsLoopback() {
					t.Errorf("%s listens on loopback only, out of the Service's and the kubelet's reach", a)
					continue
				}
				n, _ := strconv.Atoi(port)
				listened[int32(n)] = flag
			}
			// Every listener is set, to an address or off: none is left
			// at serve's loopback default.
			for _, flag := range []string{"--listen-ca", "--listen-monitoring", "--listen-bundle", "--listen-authz", "--listen-injector", "--listen-ui"} {
				if !set[flag] {
					t.Errorf("the chart leaves %s at serve's loopback default", flag)
				}
			}
			containerPort := func(p intstr.IntOrString) int32 {
				if p.Type == intstr.Int {
					return p.IntVal
				}
				for _, cp := range serve.Ports {
					if cp.Name == p.StrVal {
						return cp.ContainerPort
					}
				}
				t.Errorf("port %q is not a port of the serve container", p.StrVal)
				return 0
			}
			used := map[string]intstr.IntOrString{}
			for _, p := range svc.Spec.Ports {
				used["Service port "+p.Name] = p.TargetPort
			}
			for what, probe := range map[string]*corev1.Probe{"readiness probe": serve.ReadinessProbe, "liveness probe": serve.LivenessProbe, "startup probe": serve.StartupProbe} {
				if probe != nil && probe.HTTPGet != nil {
					used[what] = probe.HTTPGet.Port
				}
			}
			for what, p := range used {
				if n := containerPort(p); n != 0 && listened[n] == "" {
					t.Errorf("%s goes to container port %d, which no --listen-* flag of serve opens off loopback (serve's default is loopback)", what, n)
				}
			}
		})
	}
}
