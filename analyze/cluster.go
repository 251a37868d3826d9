package analyze

import (
	"context"
	"fmt"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	policykube "github.com/trustmesh/trustmesh/authz/source/kube"
	"github.com/trustmesh/trustmesh/mesh"
	meshkube "github.com/trustmesh/trustmesh/mesh/kube"
)

// Cluster is what analyze reads from a cluster: every AuthorizationPolicy,
// converted as the Kubernetes policy source converts them, with their
// creation times, and the mesh as the control plane's mesh source builds it.
type Cluster struct {
	// Policies holds the accepted policies and a TMA000 finding for every
	// object the engine refuses.
	Policies *Policies
	// Created maps a policy's Key to its creationTimestamp.
	Created map[string]time.Time
	Mesh    *mesh.Mesh
}

// ClusterConfig says which cluster to read.
type ClusterConfig struct {
	// Kubeconfig and Context select the cluster; Rest, when set, is used
	// instead (tests).
	Kubeconfig string
	Context    string
	Rest       *rest.Config
	// TrustDomain is the mesh's, for the workloads' SPIFFE IDs.
	TrustDomain spiffeid.TrustDomain
}

// ReadCluster lists the cluster's AuthorizationPolicies (security.istio.io
// v1, the view of every stored one) and syncs the mesh source once, then
// stops it.
func ReadCluster(ctx context.Context, cfg ClusterConfig) (*Cluster, error) {
	rc := cfg.Rest
	if rc == nil {
		rules := clientcmd.NewDefaultClientConfigLoadingRules()
		rules.ExplicitPath = cfg.Kubeconfig
		var err error
		rc, err = clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: cfg.Context}).ClientConfig()
		if err != nil {
			return nil, fmt.Errorf("analyze: kubeconfig: %w", err)
		}
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("analyze: Kubernetes client: %w", err)
	}
	istio, err := istioclient.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("analyze: Istio client: %w", err)
	}

	list, err := istio.SecurityV1().AuthorizationPolicies(metav1.NamespaceAll).List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("analyze: list AuthorizationPolicies: %w", err)
	}
	c := &Cluster{Policies: &Policies{}, Created: map[string]time.Time{}}
	for i := range list.Items {
		o := list.Items[i]
		// The conversion and checks of the Kubernetes policy source.
		p, err := policykube.ConvertV1(o)
		if err != nil {
			c.Policies.Refuse("cluster", "AuthorizationPolicy "+o.Namespace+"/"+o.Name, err)
			continue
		}
		c.Policies.AddPolicy(p)
		c.Created[p.Key()] = o.CreationTimestamp.Time
	}

	src := &meshkube.Source{Client: kube, Istio: istio, TrustDomain: cfg.TrustDomain}
	wctx, stop := context.WithCancel(ctx)
	done, err := src.Watch(wctx, func() {})
	if err != nil {
		stop()
		return nil, fmt.Errorf("analyze: %w", err)
	}
	c.Mesh, err = src.Mesh()
	stop()
	<-done
	if err != nil {
		return nil, fmt.Errorf("analyze: %w", err)
	}
	return c, nil
}
