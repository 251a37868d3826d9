package controlplane

import (
	"github.com/trustmesh/trustmesh/mesh"
	meshkube "github.com/trustmesh/trustmesh/mesh/kube"
)

// meshSource is the mesh model that the xDS server, and the authorization
// service for its gateway identities (remote.ip), read: the --mesh
// directory, or the cluster on Kubernetes; nil when there is no mesh. Each
// gets its own watcher until one mesh feed serves both (issue 12).
func (cp *ControlPlane) meshSource(v *validated) mesh.Source {
	switch {
	case v.XDS.MeshDir != "":
		return &mesh.Dir{Path: v.XDS.MeshDir}
	case !v.inKube:
		return nil
	}
	return &meshkube.Source{Client: cp.cluster.kube, Istio: cp.cluster.istio, TrustDomain: v.td}
}
