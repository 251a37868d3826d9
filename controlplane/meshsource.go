package controlplane

import (
	"fmt"

	"istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/kubernetes"

	"github.com/trustmesh/trustmesh/mesh"
	meshkube "github.com/trustmesh/trustmesh/mesh/kube"
)

// meshSource is the mesh model that the xDS server, and the authorization
// service for its gateway identities (remote.ip), read: the --mesh
// directory, or the cluster on Kubernetes; nil when there is no mesh. Each
// gets its own watcher until one mesh feed serves both (issue 12).
func meshSource(v *validated) (mesh.Source, error) {
	switch {
	case v.XDS.MeshDir != "":
		return &mesh.Dir{Path: v.XDS.MeshDir}, nil
	case !v.inKube:
		return nil, nil
	}
	restCfg, err := restConfig(v.Kubernetes.RestConfig, v.Kubernetes.Kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: Kubernetes client: %w", err)
	}
	istio, err := versioned.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: Istio client: %w", err)
	}
	return &meshkube.Source{Client: client, Istio: istio, TrustDomain: v.td}, nil
}
