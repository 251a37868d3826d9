package controlplane

import (
	"fmt"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/authz/source/kube"
)

// policies is the one AuthorizationPolicy feed that both the authorization
// service and the RBAC pushed over xDS follow, so that they enforce the same
// snapshot: it reads the --policies directory, or the cluster's
// AuthorizationPolicies on Kubernetes, with one watch and one parse per
// change. It is built on the first call and run by Run; nil when there are
// no policies.
func (cp *ControlPlane) policies(v *validated) (*source.Feed, error) {
	if cp.policyFeed != nil {
		return cp.policyFeed, nil
	}
	var src source.PolicySource
	switch {
	case v.Authz.PolicyDir != "":
		src = &source.Dir{Path: v.Authz.PolicyDir, DefaultNamespace: "default"}
	case !v.inKube:
		return nil, nil
	default:
		src = &kube.Source{Client: cp.cluster.istio}
	}
	feed, err := source.NewFeed(source.FeedConfig{Policies: src, Log: v.Log, Registerer: cp.registry})
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	cp.policyFeed = feed
	return feed, nil
}
