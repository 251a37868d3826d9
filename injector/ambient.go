package injector

import (
	"fmt"
	"slices"

	corev1 "k8s.io/api/core/v1"
	"k8s.io/apimachinery/pkg/api/equality"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// NamespaceLabels gives a namespace's labels, from which the injector
// reads its dataplane mode. The webhook's reads them from the API server;
// an error stops the pod (a pod of an ambient namespace must not get a
// sidecar because its namespace could not be read).
type NamespaceLabels interface {
	NamespaceLabels(name string) (map[string]string, error)
}

// NamespaceLabelsFunc adapts a function to NamespaceLabels.
type NamespaceLabelsFunc func(name string) (map[string]string, error)

// NamespaceLabels calls f.
func (f NamespaceLabelsFunc) NamespaceLabels(name string) (map[string]string, error) { return f(name) }

// dataplaneLabels are the labels that set the dataplane mode, ours first.
var dataplaneLabels = []string{LabelDataplaneMode, IstioLabelDataplaneMode}

// ambient reports whether the pod is in ambient mode: a pod labelled
// "none" is not (whatever its namespace says), a pod labelled "ambient"
// is, and otherwise a pod is when its namespace is labelled "ambient". The
// namespace is read only when the pod's own labels do not decide.
func ambient(namespace string, meta *metav1.ObjectMeta, namespaces NamespaceLabels) (bool, error) {
	var pod []string
	for _, k := range dataplaneLabels {
		pod = append(pod, meta.Labels[k])
	}
	switch {
	case slices.Contains(pod, DataplaneModeNone):
		return false, nil
	case slices.Contains(pod, DataplaneModeAmbient):
		return true, nil
	case namespaces == nil || namespace == "":
		return false, nil
	}
	labels, err := namespaces.NamespaceLabels(namespace)
	if err != nil {
		return false, fmt.Errorf("injector: the labels of namespace %s, which say whether its pods are ambient: %w", namespace, err)
	}
	for _, k := range dataplaneLabels {
		if labels[k] == DataplaneModeAmbient {
			return true, nil
		}
	}
	return false, nil
}

// injectAmbient handles a pod in ambient mode: it gets no sidecar, and,
// only when it asks with AnnotationWorkloadAPI, the node agent's socket
// directory mounted read-only in every container with
// SPIFFE_ENDPOINT_SOCKET pointing at it. Nothing else is changed, no
// status annotation either: what is already there is checked, what is
// missing (a container added since) is added, so injecting again is a
// no-op.
func injectAmbient(meta *metav1.ObjectMeta, spec *corev1.PodSpec) (Result, error) {
	v, ok := meta.Annotations[AnnotationWorkloadAPI]
	if !ok {
		return Result{Skipped: SkipAmbient}, nil
	}
	if v != WorkloadAPINode {
		return Result{}, refuse(RefusedWorkloadAPI, "annotation %s is %q; the one value is %q, for the node agent's socket",
			AnnotationWorkloadAPI, v, WorkloadAPINode)
	}
	changed := false
	want := corev1.Volume{Name: VolumeNodeSocket, VolumeSource: corev1.VolumeSource{HostPath: &corev1.HostPathVolumeSource{
		// Directory, not DirectoryOrCreate: without the node agent the
		// pod does not start, rather than start with an empty directory.
		Path: NodeSocketDir, Type: ptr(corev1.HostPathDirectory),
	}}}
	if i := slices.IndexFunc(spec.Volumes, func(v corev1.Volume) bool { return v.Name == VolumeNodeSocket }); i >= 0 {
		if !equality.Semantic.DeepEqual(spec.Volumes[i], want) {
			return Result{}, refuse(RefusedConflict, "the pod already has a volume named %s that is not the host directory %s", VolumeNodeSocket, NodeSocketDir)
		}
	} else {
		spec.Volumes = append(spec.Volumes, want)
		changed = true
	}
	endpoint := "unix://" + NodeSocketPath
	for _, cs := range [][]corev1.Container{spec.InitContainers, spec.Containers} {
		for i := range cs {
			c := &cs[i]
			mounted := false
			for _, m := range c.VolumeMounts {
				switch {
				case m.Name == VolumeNodeSocket && (m.MountPath != NodeSocketDir || !m.ReadOnly || m.SubPath != "" || m.SubPathExpr != ""):
					return Result{}, refuse(RefusedConflict, "container %s mounts volume %s other than read-only at %s", c.Name, VolumeNodeSocket, NodeSocketDir)
				case m.Name == VolumeNodeSocket:
					mounted = true
				case m.MountPath == NodeSocketDir:
					return Result{}, refuse(RefusedConflict, "container %s mounts volume %s at %s, where the node agent's socket goes", c.Name, m.Name, NodeSocketDir)
				}
			}
			if !mounted {
				c.VolumeMounts = append(c.VolumeMounts, corev1.VolumeMount{Name: VolumeNodeSocket, MountPath: NodeSocketDir, ReadOnly: true})
				changed = true
			}
			if j := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == EnvWorkloadAPI }); j >= 0 {
				if e := c.Env[j]; e.Value != endpoint || e.ValueFrom != nil {
					return Result{}, refuse(RefusedConflict, "container %s sets %s, which the node agent's Workload API needs as %s", c.Name, EnvWorkloadAPI, endpoint)
				}
			} else {
				c.Env = append(c.Env, corev1.EnvVar{Name: EnvWorkloadAPI, Value: endpoint})
				changed = true
			}
		}
	}
	if !changed {
		return Result{Skipped: SkipAlreadyInjected}, nil
	}
	return Result{Injected: true, Template: TemplateWorkloadAPI}, nil
}
