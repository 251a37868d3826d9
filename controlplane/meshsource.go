package controlplane

import (
	"fmt"

	"github.com/trustmesh/trustmesh/mesh"
	meshkube "github.com/trustmesh/trustmesh/mesh/kube"
)

// meshSource is the one mesh feed that both the xDS server and the
// authorization service, for its gateway identities (remote.ip), follow, so
// that they read the same mesh snapshot: it reads the --mesh directory, or
// the cluster on Kubernetes, with one watch and one parse per change. It is
// built on the first call and run by Run; nil when there is no mesh.
func (cp *ControlPlane) meshSource(v *validated) (mesh.Source, error) {
	if cp.meshFeed != nil {
		return cp.meshFeed, nil
	}
	var src mesh.Source
	switch {
	case v.XDS.MeshDir != "":
		src = &mesh.Dir{Path: v.XDS.MeshDir}
	case !v.inKube:
		return nil, nil
	default:
		src = &meshkube.Source{Client: cp.cluster.kube, Istio: cp.cluster.istio, TrustDomain: v.td}
	}
	feed, err := mesh.NewFeed(mesh.FeedConfig{Source: src, Log: v.Log, Registerer: cp.registry})
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	cp.meshFeed = feed
	return feed, nil
}
