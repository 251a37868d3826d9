package kube

import (
	"slices"

	corev1 "k8s.io/api/core/v1"

	"github.com/trustmesh/trustmesh/mesh"
)

// The labels that set a pod's data-plane mode, on the pod or its
// namespace, and their values. They are the injector's (injector.
// LabelDataplaneMode and the rest), copied because the model knows none of
// its consumers; a test in the injector checks that both read a pod alike.
const (
	LabelDataplaneMode      = "trustmesh.io/dataplane-mode"
	IstioLabelDataplaneMode = "istio.io/dataplane-mode"
	DataplaneModeAmbient    = "ambient"
	DataplaneModeNone       = "none"
	// LabelProxy is the label the injector sets on a pod it gave a proxy:
	// ProxySidecar for a sidecar, "router" for a gateway.
	LabelProxy   = "trustmesh.io/proxy"
	ProxySidecar = "sidecar"
)

// systemNamespaces are never captured, as the injector never injects them.
var systemNamespaces = []string{"kube-system", "kube-public", "kube-node-lease"}

// DataPlaneMode is how a pod's traffic is carried, given its namespace's
// labels:
//   - a pod on the host network, or in a system namespace, is not in the
//     mesh (DataPlaneNone): the node's own traffic is never captured;
//   - a pod the injector gave a sidecar is DataPlaneSidecar, whatever the
//     labels say now (its namespace may have turned ambient since: the
//     node proxy leaves it to its sidecar, as Istio's CNI does);
//   - a pod labelled "none" (either label) is not in the mesh, one
//     labelled "ambient" is ambient, and otherwise it is ambient when its
//     namespace is labelled "ambient", as the injector decides;
//   - anything else is DataPlaneNone. A gateway ("router") is reached on
//     its own ports, not over HBONE, and is DataPlaneNone too.
func DataPlaneMode(pod *corev1.Pod, namespaceLabels map[string]string) mesh.DataPlaneMode {
	if pod.Spec.HostNetwork || slices.Contains(systemNamespaces, pod.Namespace) {
		return mesh.DataPlaneNone
	}
	if pod.Labels[LabelProxy] == ProxySidecar {
		return mesh.DataPlaneSidecar
	}
	keys := []string{LabelDataplaneMode, IstioLabelDataplaneMode}
	var own []string
	for _, k := range keys {
		own = append(own, pod.Labels[k])
	}
	switch {
	case slices.Contains(own, DataplaneModeNone):
		return mesh.DataPlaneNone
	case slices.Contains(own, DataplaneModeAmbient):
		return mesh.DataPlaneAmbient
	}
	for _, k := range keys {
		if namespaceLabels[k] == DataplaneModeAmbient {
			return mesh.DataPlaneAmbient
		}
	}
	return mesh.DataPlaneNone
}

// podAddresses are a pod's IPs, none for a pod on the host network (its
// address is its node's, which no workload owns) or one that has finished
// (its address may already be another pod's).
func podAddresses(pod *corev1.Pod) []string {
	if pod.Spec.HostNetwork || pod.Status.Phase == corev1.PodSucceeded || pod.Status.Phase == corev1.PodFailed {
		return nil
	}
	var out []string
	for _, ip := range pod.Status.PodIPs {
		if ip.IP != "" && !slices.Contains(out, ip.IP) {
			out = append(out, ip.IP)
		}
	}
	if len(out) == 0 && pod.Status.PodIP != "" {
		out = append(out, pod.Status.PodIP)
	}
	return out
}
