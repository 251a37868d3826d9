package injector_test

import (
	"errors"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/util/intstr"

	"github.com/trustmesh/trustmesh/api/probe"
	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/injector/capture"
)

func basePod() *corev1.Pod {
	return &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "p", Namespace: "shop", Labels: map[string]string{"app": "p"}},
		Spec: corev1.PodSpec{Containers: []corev1.Container{{
			Name: "app", Image: "registry.example/app:1",
			Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
		}}},
	}
}

func ptr[T any](v T) *T { return &v }

func TestSkipAndRefuse(t *testing.T) {
	inj := goldenInjector(t)
	for _, tc := range []struct {
		name      string
		namespace string
		mutate    func(p *corev1.Pod)
		skip      injector.SkipReason
		refused   injector.Code
	}{
		{name: "injected", mutate: func(*corev1.Pod) {}},
		{name: "kube-system", namespace: "kube-system", skip: injector.SkipExcludedNamespace},
		{name: "kube-public", namespace: "kube-public", skip: injector.SkipExcludedNamespace},
		{name: "own namespace", namespace: "trustmesh-system", skip: injector.SkipExcludedNamespace},
		{name: "host network", mutate: func(p *corev1.Pod) { p.Spec.HostNetwork = true }, skip: injector.SkipHostNetwork},
		{name: "opted out by annotation", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.InjectKey: "false"}
		}, skip: injector.SkipOptedOut},
		{name: "opted out by label", mutate: func(p *corev1.Pod) { p.Labels[injector.InjectKey] = "false" }, skip: injector.SkipOptedOut},
		{name: "opt-out value that is not false injects", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.InjectKey: "no"}
		}},
		{name: "istio opt-out ignored without compatibility", mutate: func(p *corev1.Pod) {
			p.Labels[injector.IstioInjectKey] = "false"
		}},
		{name: "istio proxy container", mutate: func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy", Image: "istio/proxyv2"})
		}, refused: injector.RefusedIstioProxy},
		{name: "istio native sidecar", mutate: func(p *corev1.Pod) {
			p.Spec.InitContainers = append(p.Spec.InitContainers, corev1.Container{Name: "istio-proxy", Image: "istio/proxyv2",
				RestartPolicy: ptr(corev1.ContainerRestartPolicyAlways)})
		}, refused: injector.RefusedIstioProxy},
		{name: "istio status annotation", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.IstioStatus: "{}"}
		}, refused: injector.RefusedIstioProxy},
		{name: "istio proxy after trustmesh injection", mutate: func(p *corev1.Pod) {
			if _, err := inj.InjectPod("shop", &p.ObjectMeta, &p.Spec); err != nil {
				panic(err)
			}
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy", Image: "istio/proxyv2"})
		}, refused: injector.RefusedIstioProxy},
		{name: "already injected", mutate: func(p *corev1.Pod) {
			if _, err := inj.InjectPod("shop", &p.ObjectMeta, &p.Spec); err != nil {
				panic(err)
			}
		}, skip: injector.SkipAlreadyInjected},
		{name: "status without the sidecar", mutate: func(p *corev1.Pod) {
			if _, err := inj.InjectPod("shop", &p.ObjectMeta, &p.Spec); err != nil {
				panic(err)
			}
			p.Spec.InitContainers = p.Spec.InitContainers[:1]
		}, refused: injector.RefusedPartial},
		{name: "forged status", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationStatus: "injected"}
		}, refused: injector.RefusedPartial},
		{name: "container name taken", mutate: func(p *corev1.Pod) { p.Spec.Containers[0].Name = injector.ContainerProxy },
			refused: injector.RefusedConflict},
		{name: "volume name taken", mutate: func(p *corev1.Pod) {
			p.Spec.Volumes = []corev1.Volume{{Name: injector.VolumeToken}}
		}, refused: injector.RefusedConflict},
		{name: "reserved port", mutate: func(p *corev1.Pod) { p.Spec.Containers[0].Ports[0].ContainerPort = 15001 },
			refused: injector.RefusedConflict},
		{name: "reserved port over UDP is fine", mutate: func(p *corev1.Pod) {
			p.Spec.Containers[0].Ports[0] = corev1.ContainerPort{ContainerPort: 15001, Protocol: corev1.ProtocolUDP}
		}},
		{name: "container as proxy uid", mutate: func(p *corev1.Pod) {
			p.Spec.Containers[0].SecurityContext = &corev1.SecurityContext{RunAsUser: ptr(int64(1337))}
		}, refused: injector.RefusedProxyUID},
		{name: "pod as proxy gid", mutate: func(p *corev1.Pod) {
			p.Spec.SecurityContext = &corev1.PodSecurityContext{RunAsGroup: ptr(int64(1337))}
		}, refused: injector.RefusedProxyUID},
		{name: "pod in proxy group", mutate: func(p *corev1.Pod) {
			p.Spec.SecurityContext = &corev1.PodSecurityContext{SupplementalGroups: []int64{1337}}
		}, refused: injector.RefusedProxyUID},
		{name: "allowed exclusions", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{
				injector.AnnotationExcludeOutboundPorts: "5432, 6380",
				injector.AnnotationExcludeOutboundCIDRs: "10.96.1.0/24,fd00:1::/48",
				injector.AnnotationExcludeInboundPorts:  "9100",
			}
		}},
		{name: "outbound port beyond the limits", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationExcludeOutboundPorts: "443"}
		}, refused: injector.RefusedExclusion},
		{name: "CIDR wider than the limits", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationExcludeOutboundCIDRs: "10.0.0.0/8"}
		}, refused: injector.RefusedExclusion},
		{name: "everything excluded", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationExcludeOutboundCIDRs: "0.0.0.0/0"}
		}, refused: injector.RefusedExclusion},
		{name: "malformed exclusion", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationExcludeInboundPorts: "*"}
		}, refused: injector.RefusedExclusion},
		{name: "probe on an unknown named port", mutate: func(p *corev1.Pod) {
			p.Spec.Containers[0].LivenessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{
				HTTPGet: &corev1.HTTPGetAction{Path: "/", Port: intstr.FromString("admin")}}}
		}, refused: injector.RefusedProbe},
		{name: "probe on the proxy's port", mutate: func(p *corev1.Pod) {
			p.Spec.Containers[0].ReadinessProbe = &corev1.Probe{ProbeHandler: corev1.ProbeHandler{
				TCPSocket: &corev1.TCPSocketAction{Port: intstr.FromInt32(15021)}}}
		}, refused: injector.RefusedProbe},
		{name: "unknown template", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationTemplate: "ambient"}
		}, refused: injector.RefusedTemplate},
		{name: "gateway without its proxy container", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationTemplate: "gateway"}
		}, refused: injector.RefusedTemplate},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := basePod()
			if tc.namespace != "" {
				p.Namespace = tc.namespace
			}
			if tc.mutate != nil {
				tc.mutate(p)
			}
			before := p.DeepCopy()
			res, err := inj.InjectPod(p.Namespace, &p.ObjectMeta, &p.Spec)
			if tc.refused != "" {
				if got := injector.CodeOf(err); got != tc.refused {
					t.Fatalf("refusal code %q (%v), want %q", got, err, tc.refused)
				}
				if p.String() != before.String() {
					t.Error("a refused pod was changed")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if tc.skip != "" {
				if res.Injected || res.Skipped != tc.skip {
					t.Fatalf("result %+v, want skipped for %s", res, tc.skip)
				}
				if p.String() != before.String() {
					t.Error("a skipped pod was changed")
				}
				return
			}
			if !res.Injected {
				t.Fatalf("not injected: %+v", res)
			}
			if len(p.Spec.InitContainers) < 3 || p.Spec.InitContainers[2].Name != injector.ContainerProxy {
				t.Errorf("no native sidecar proxy in %v", p.Spec.InitContainers)
			}
		})
	}
}

func TestExclusionErrorsAreTyped(t *testing.T) {
	inj := goldenInjector(t)
	p := basePod()
	p.Annotations = map[string]string{
		injector.AnnotationExcludeOutboundPorts: "443,x",
		injector.AnnotationExcludeOutboundCIDRs: "0.0.0.0/0",
	}
	_, err := inj.InjectPod("shop", &p.ObjectMeta, &p.Spec)
	if !errors.Is(err, capture.ErrNotAllowed) || !errors.Is(err, capture.ErrMalformed) {
		t.Fatalf("want both ErrNotAllowed and ErrMalformed in %v", err)
	}
}

func TestIstioCompatibility(t *testing.T) {
	for _, tc := range []struct {
		name   string
		compat bool
		labels map[string]string
		annots map[string]string
		inject bool
	}{
		{name: "istio label opt-out honoured", compat: true, labels: map[string]string{injector.IstioInjectKey: "false"}},
		{name: "istio annotation opt-out honoured", compat: true, annots: map[string]string{injector.IstioInjectKey: "false"}},
		{name: "istio opt-in injects", compat: true, labels: map[string]string{injector.IstioInjectKey: "true"}, inject: true},
		{name: "istio opt-out ignored when off", labels: map[string]string{injector.IstioInjectKey: "false"}, inject: true},
		{name: "trustmesh opt-out wins over istio opt-in", compat: true,
			labels: map[string]string{injector.IstioInjectKey: "true", injector.InjectKey: "false"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			inj, err := injector.New(injector.Config{Mesh: injector.MeshConfig{IstioCompatibility: tc.compat}})
			if err != nil {
				t.Fatal(err)
			}
			p := basePod()
			for k, v := range tc.labels {
				p.Labels[k] = v
			}
			p.Annotations = tc.annots
			res, err := inj.InjectPod("shop", &p.ObjectMeta, &p.Spec)
			if err != nil {
				t.Fatal(err)
			}
			if res.Injected != tc.inject {
				t.Fatalf("injected %v, want %v (%+v)", res.Injected, tc.inject, res)
			}
		})
	}
}

func TestProbersReachTheAgent(t *testing.T) {
	inj := goldenInjector(t)
	p := basePod()
	p.Spec.Containers[0].ReadinessProbe = &corev1.Probe{
		ProbeHandler:   corev1.ProbeHandler{HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}},
		TimeoutSeconds: 4,
	}
	if _, err := inj.InjectPod("shop", &p.ObjectMeta, &p.Spec); err != nil {
		t.Fatal(err)
	}
	var text string
	for _, e := range p.Spec.InitContainers[1].Env {
		if e.Name == probe.EnvVar {
			text = e.Value
		}
	}
	probers, err := probe.Decode(text)
	if err != nil {
		t.Fatal(err)
	}
	path := probe.Path("app", probe.Readiness)
	got := probers[path]
	if got == nil || got.HTTPGet == nil || got.HTTPGet.Port != 8080 || got.HTTPGet.Path != "/ready" || got.TimeoutSeconds != 4 {
		t.Fatalf("prober %s = %+v", path, got)
	}
	rewritten := p.Spec.Containers[0].ReadinessProbe.HTTPGet
	if rewritten.Path != path || rewritten.Port.IntValue() != probe.Port {
		t.Fatalf("probe not rewritten to the agent: %+v", rewritten)
	}
}

func TestMeshConfigValidation(t *testing.T) {
	for _, tc := range []struct {
		name string
		yaml string
		want []string // each a part of the error
	}{
		{name: "defaults", yaml: ``},
		{name: "unknown field", yaml: "proxyImage: x\n", want: []string{"proxyImage"}},
		{name: "every problem at once", yaml: `
trustDomain: "not a domain!"
caAddress: trustmesh
imagePullPolicy: Sometimes
proxy:
  uid: -1
  logLevel: loud
capture:
  excludableOutboundCIDRs: ["10.0.0.0/33"]
  excludableInboundPorts: ["70000"]
`, want: []string{"trust domain", "CA address", "image pull policy", "uid", "log level", "10.0.0.0/33", "70000"}},
		{name: "control plane outside the trust domain", yaml: "trustDomain: a.org\ncontrolPlaneID: spiffe://b.org/ns/x/sa/y\n",
			want: []string{"outside trust domain"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mesh, err := injector.ParseMeshConfig([]byte(tc.yaml))
			if err == nil {
				_, err = injector.New(injector.Config{Mesh: mesh})
			}
			if len(tc.want) == 0 {
				if err != nil {
					t.Fatal(err)
				}
				return
			}
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error does not mention %q: %v", w, err)
				}
			}
		})
	}
}
