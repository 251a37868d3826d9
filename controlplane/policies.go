package controlplane

import (
	"fmt"

	"istio.io/client-go/pkg/clientset/versioned"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/authz/source/kube"
)

// policies is the AuthorizationPolicy source that both the authorization
// service and the RBAC pushed over xDS read: the --policies directory, or
// the cluster's AuthorizationPolicies on Kubernetes; nil when there are no
// policies.
func (cp *ControlPlane) policies(v *validated) (source.PolicySource, error) {
	switch {
	case v.Authz.PolicyDir != "":
		return &source.Dir{Path: v.Authz.PolicyDir, DefaultNamespace: "default"}, nil
	case !v.inKube:
		return nil, nil
	}
	restCfg, err := restConfig(v.Kubernetes.RestConfig, v.Kubernetes.Kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := versioned.NewForConfig(restCfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: Istio client: %w", err)
	}
	return &kube.Source{Client: client}, nil
}
