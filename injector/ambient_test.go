package injector_test

import (
	"errors"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"

	"github.com/trustmesh/trustmesh/injector"
)

// namespaceLabels is a cluster's namespaces for the injector; an unknown
// namespace is an error, as a failed read would be.
func namespaceLabels(ns map[string]map[string]string) injector.NamespaceLabels {
	return injector.NamespaceLabelsFunc(func(name string) (map[string]string, error) {
		l, ok := ns[name]
		if !ok {
			return nil, errors.New("namespace " + name + " not found")
		}
		return l, nil
	})
}

func ambientInjector(t *testing.T) *injector.Injector {
	t.Helper()
	mesh, err := injector.LoadMeshConfig("testdata/mesh.yaml")
	if err != nil {
		t.Fatal(err)
	}
	inj, err := injector.New(injector.Config{Mesh: mesh, Namespaces: namespaceLabels(map[string]map[string]string{
		"shop":    {injector.LabelInjection: "enabled"},
		"istio":   {injector.LabelInjection: "enabled", injector.IstioLabelDataplaneMode: "ambient"},
		"ours":    {injector.LabelDataplaneMode: "ambient"},
		"sidecar": {injector.LabelInjection: "enabled", injector.IstioLabelDataplaneMode: "none"},
	})})
	if err != nil {
		t.Fatal(err)
	}
	return inj
}

func withSocket(p *corev1.Pod) {
	if p.Annotations == nil {
		p.Annotations = map[string]string{}
	}
	p.Annotations[injector.AnnotationWorkloadAPI] = injector.WorkloadAPINode
}

// TestAmbientMode: a pod in ambient mode, by its namespace's label or its
// own, gets no sidecar; "none" on the pod restores the sidecar rules; the
// namespace is read only when the pod's labels do not decide, and a failed
// read stops the pod rather than give it a sidecar.
func TestAmbientMode(t *testing.T) {
	inj := ambientInjector(t)
	for _, tc := range []struct {
		name      string
		namespace string
		mutate    func(*corev1.Pod)
		want      injector.Result
		refused   injector.Code
		err       bool
	}{
		{name: "Istio's namespace label", namespace: "istio", want: injector.Result{Skipped: injector.SkipAmbient}},
		{name: "trustmesh's namespace label", namespace: "ours", want: injector.Result{Skipped: injector.SkipAmbient}},
		{name: "namespace labelled none", namespace: "sidecar", want: injector.Result{Injected: true, Template: injector.TemplateSidecar}},
		{name: "the pod's Istio label", namespace: "shop", mutate: func(p *corev1.Pod) {
			p.Labels[injector.IstioLabelDataplaneMode] = "ambient"
		}, want: injector.Result{Skipped: injector.SkipAmbient}},
		{name: "the pod's trustmesh label", namespace: "shop", mutate: func(p *corev1.Pod) {
			p.Labels[injector.LabelDataplaneMode] = "ambient"
		}, want: injector.Result{Skipped: injector.SkipAmbient}},
		{name: "the pod's label decides without the namespace", namespace: "unreadable", mutate: func(p *corev1.Pod) {
			p.Labels[injector.IstioLabelDataplaneMode] = "ambient"
		}, want: injector.Result{Skipped: injector.SkipAmbient}},
		{name: "pod opted out of ambient", namespace: "istio", mutate: func(p *corev1.Pod) {
			p.Labels[injector.IstioLabelDataplaneMode] = "none"
		}, want: injector.Result{Injected: true, Template: injector.TemplateSidecar}},
		{name: "pod opted out of ambient with trustmesh's label", namespace: "ours", mutate: func(p *corev1.Pod) {
			p.Labels[injector.LabelDataplaneMode] = "none"
		}, want: injector.Result{Injected: true, Template: injector.TemplateSidecar}},
		{name: "none wins over ambient on the pod", namespace: "shop", mutate: func(p *corev1.Pod) {
			p.Labels[injector.LabelDataplaneMode] = "ambient"
			p.Labels[injector.IstioLabelDataplaneMode] = "none"
		}, want: injector.Result{Injected: true, Template: injector.TemplateSidecar}},
		{name: "opted out of injection altogether", namespace: "istio", mutate: func(p *corev1.Pod) {
			withSocket(p)
			p.Labels[injector.InjectKey] = "false"
		}, want: injector.Result{Skipped: injector.SkipOptedOut}},
		{name: "a namespace that cannot be read", namespace: "unreadable", err: true},
		{name: "the Workload API", namespace: "istio", mutate: withSocket,
			want: injector.Result{Injected: true, Template: injector.TemplateWorkloadAPI}},
		{name: "another Workload API", namespace: "istio", mutate: func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationWorkloadAPI: "csi"}
		}, refused: injector.RefusedWorkloadAPI},
		{name: "the Workload API without ambient mode", namespace: "shop", mutate: withSocket, refused: injector.RefusedWorkloadAPI},
		{name: "a volume of the same name", namespace: "istio", mutate: func(p *corev1.Pod) {
			withSocket(p)
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: injector.VolumeNodeSocket,
				VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
		}, refused: injector.RefusedConflict},
		{name: "something else mounted at the socket directory", namespace: "istio", mutate: func(p *corev1.Pod) {
			withSocket(p)
			p.Spec.Volumes = append(p.Spec.Volumes, corev1.Volume{Name: "run", VolumeSource: corev1.VolumeSource{EmptyDir: &corev1.EmptyDirVolumeSource{}}})
			p.Spec.Containers[0].VolumeMounts = []corev1.VolumeMount{{Name: "run", MountPath: injector.NodeSocketDir}}
		}, refused: injector.RefusedConflict},
		{name: "a container with its own endpoint", namespace: "istio", mutate: func(p *corev1.Pod) {
			withSocket(p)
			p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: injector.EnvWorkloadAPI, Value: "unix:///tmp/spire.sock"}}
		}, refused: injector.RefusedConflict},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := basePod()
			p.Namespace = tc.namespace
			if tc.mutate != nil {
				tc.mutate(p)
			}
			orig := p.DeepCopy()
			res, err := inj.InjectPod(p.Namespace, &p.ObjectMeta, &p.Spec)
			switch {
			case tc.err:
				if err == nil || injector.CodeOf(err) != "" {
					t.Fatalf("error %v, want a failure that is not a refusal", err)
				}
			case tc.refused != "":
				if injector.CodeOf(err) != tc.refused {
					t.Fatalf("error %v, want refusal %s", err, tc.refused)
				}
			case err != nil:
				t.Fatal(err)
			case res != tc.want:
				t.Fatalf("result %+v, want %+v", res, tc.want)
			}
			if !res.Injected && !equality.Semantic.DeepEqual(p, orig) {
				t.Errorf("the pod changed:\n%+v\nwas\n%+v", p, orig)
			}
		})
	}
}

// TestWorkloadAPIMutatesNothingElse: an ambient pod that asks for the
// Workload API gets the socket's host directory, read-only in every
// container, and SPIFFE_ENDPOINT_SOCKET; take those away and the pod is
// what it was. A container added since (a later webhook, then
// reinvocation) gets them too; injecting again changes nothing.
func TestWorkloadAPIMutatesNothingElse(t *testing.T) {
	inj := ambientInjector(t)
	p := basePod()
	p.Namespace = "istio"
	withSocket(p)
	p.Spec.InitContainers = []corev1.Container{{Name: "fetch", Image: "registry.example/fetch:1"}}
	p.Spec.Containers[0].Env = []corev1.EnvVar{{Name: "LOG", Value: "debug"}}
	orig := p.DeepCopy()
	if _, err := inj.InjectPod(p.Namespace, &p.ObjectMeta, &p.Spec); err != nil {
		t.Fatal(err)
	}
	check := func(c corev1.Container) corev1.Container {
		t.Helper()
		n := len(c.VolumeMounts)
		if n == 0 || !equality.Semantic.DeepEqual(c.VolumeMounts[n-1], corev1.VolumeMount{Name: injector.VolumeNodeSocket, MountPath: "/run/trustmesh/node", ReadOnly: true}) {
			t.Errorf("container %s mounts %+v", c.Name, c.VolumeMounts)
		} else {
			c.VolumeMounts = c.VolumeMounts[:n-1]
		}
		n = len(c.Env)
		if n == 0 || c.Env[n-1] != (corev1.EnvVar{Name: "SPIFFE_ENDPOINT_SOCKET", Value: "unix:///run/trustmesh/node/socket"}) {
			t.Errorf("container %s env %+v", c.Name, c.Env)
		} else {
			c.Env = c.Env[:n-1]
		}
		if len(c.VolumeMounts) == 0 {
			c.VolumeMounts = nil
		}
		if len(c.Env) == 0 {
			c.Env = nil
		}
		return c
	}
	got := p.DeepCopy()
	for i := range got.Spec.InitContainers {
		got.Spec.InitContainers[i] = check(got.Spec.InitContainers[i])
	}
	for i := range got.Spec.Containers {
		got.Spec.Containers[i] = check(got.Spec.Containers[i])
	}
	n := len(got.Spec.Volumes)
	if n != 1 || got.Spec.Volumes[0].HostPath == nil || got.Spec.Volumes[0].HostPath.Path != "/run/trustmesh/node" ||
		*got.Spec.Volumes[0].HostPath.Type != corev1.HostPathDirectory {
		t.Fatalf("volumes %+v", got.Spec.Volumes)
	}
	got.Spec.Volumes = nil
	if !equality.Semantic.DeepEqual(got, orig) {
		t.Errorf("more than the socket changed:\n%+v\nwas\n%+v", got, orig)
	}

	again := p.DeepCopy()
	if res, err := inj.InjectPod(again.Namespace, &again.ObjectMeta, &again.Spec); err != nil || res.Injected || !equality.Semantic.DeepEqual(again, p) {
		t.Errorf("injecting again: %+v, %v", res, err)
	}
	p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "late", Image: "registry.example/late:1"})
	if res, err := inj.InjectPod(p.Namespace, &p.ObjectMeta, &p.Spec); err != nil || !res.Injected {
		t.Fatalf("a container added since: %+v, %v", res, err)
	}
	check(p.Spec.Containers[1])
	if len(p.Spec.Volumes) != 1 || len(p.Spec.Containers[0].VolumeMounts) != 1 || len(p.Spec.Containers[0].Env) != 2 {
		t.Errorf("reinjection duplicated: %+v", p.Spec)
	}
}
