package analyze

import (
	"context"
	"fmt"
	"path"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	k8slabels "k8s.io/apimachinery/pkg/labels"
	"k8s.io/apimachinery/pkg/types"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/trustmesh/trustmesh/authz/engine"
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
	rc, err := cfg.restConfig()
	if err != nil {
		return nil, err
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

// restConfig is the cluster's client configuration: Rest, or the
// kubeconfig and context.
func (cfg ClusterConfig) restConfig() (*rest.Config, error) {
	if cfg.Rest != nil {
		return cfg.Rest, nil
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = cfg.Kubeconfig
	rc, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: cfg.Context}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("analyze: kubeconfig: %w", err)
	}
	return rc, nil
}

// ControlPlane is a trustmesh control plane found running in a cluster,
// with the settings analyze must judge policies by, as its flags give them
// (serve's defaults where it has none).
type ControlPlane struct {
	// Deployment is its namespace/name.
	Deployment    string
	RootNamespace string
	TrustDomain   string
}

// FindControlPlanes returns the trustmesh control planes running in the
// cluster, found only through objects a namespace's tenant cannot write: a
// ValidatingWebhookConfiguration's or MutatingWebhookConfiguration's
// webhook names a Service (cluster-scoped objects, for cluster admins); the
// Deployments in that Service's namespace whose pods it selects are read,
// and a container among them that runs `trustmesh serve` (its image or
// command names trustmesh) with Kubernetes on is a control plane. A
// Deployment elsewhere, whatever it runs, is not one, so a tenant cannot
// plant settings. The chart sets --root-namespace to the release namespace
// unless told otherwise, so only the flags say which namespace is the root.
func FindControlPlanes(ctx context.Context, cfg ClusterConfig) ([]ControlPlane, error) {
	rc, err := cfg.restConfig()
	if err != nil {
		return nil, err
	}
	kube, err := kubernetes.NewForConfig(rc)
	if err != nil {
		return nil, fmt.Errorf("analyze: Kubernetes client: %w", err)
	}
	var services []types.NamespacedName
	add := func(ref *admissionregistrationv1.ServiceReference) {
		if ref == nil {
			return
		}
		n := types.NamespacedName{Namespace: ref.Namespace, Name: ref.Name}
		if !slices.Contains(services, n) {
			services = append(services, n)
		}
	}
	vwcs, err := kube.AdmissionregistrationV1().ValidatingWebhookConfigurations().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("analyze: list ValidatingWebhookConfigurations: %w", err)
	}
	for _, c := range vwcs.Items {
		for _, w := range c.Webhooks {
			add(w.ClientConfig.Service)
		}
	}
	mwcs, err := kube.AdmissionregistrationV1().MutatingWebhookConfigurations().List(ctx, metav1.ListOptions{})
	if err != nil {
		return nil, fmt.Errorf("analyze: list MutatingWebhookConfigurations: %w", err)
	}
	for _, c := range mwcs.Items {
		for _, w := range c.Webhooks {
			add(w.ClientConfig.Service)
		}
	}
	var out []ControlPlane
	seen := map[string]bool{}
	for _, sn := range services {
		svc, err := kube.CoreV1().Services(sn.Namespace).Get(ctx, sn.Name, metav1.GetOptions{})
		if apierrors.IsNotFound(err) {
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("analyze: get Service %s: %w", sn, err)
		}
		if len(svc.Spec.Selector) == 0 {
			continue
		}
		selects := k8slabels.SelectorFromSet(svc.Spec.Selector)
		list, err := kube.AppsV1().Deployments(sn.Namespace).List(ctx, metav1.ListOptions{})
		if err != nil {
			return nil, fmt.Errorf("analyze: list Deployments in %s: %w", sn.Namespace, err)
		}
		for _, d := range list.Items {
			name := d.Namespace + "/" + d.Name
			if seen[name] || !selects.Matches(k8slabels.Set(d.Spec.Template.Labels)) {
				continue
			}
			if cp, ok := controlPlaneOf(d.Spec.Template.Spec.Containers); ok {
				seen[name] = true
				cp.Deployment = name
				out = append(out, cp)
			}
		}
	}
	slices.SortFunc(out, func(a, b ControlPlane) int { return strings.Compare(a.Deployment, b.Deployment) })
	return out, nil
}

// controlPlaneOf returns the settings of the first container that runs
// `trustmesh serve` with Kubernetes on.
func controlPlaneOf(containers []corev1.Container) (ControlPlane, bool) {
	for _, c := range containers {
		args := append(slices.Clone(c.Command), c.Args...)
		named := strings.Contains(c.Image, "trustmesh")
		if len(args) > 0 && path.Base(args[0]) == "trustmesh" {
			named, args = true, args[1:]
		}
		if !named || len(args) == 0 || args[0] != "serve" {
			continue
		}
		if v, _ := flagValue(args, "kubernetes"); v == "off" {
			continue
		}
		cp := ControlPlane{RootNamespace: engine.DefaultRootNamespace, TrustDomain: DefaultTrustDomain}
		if v, ok := flagValue(args, "root-namespace"); ok {
			cp.RootNamespace = v
		}
		if v, ok := flagValue(args, "trust-domain"); ok {
			cp.TrustDomain = v
		}
		return cp, true
	}
	return ControlPlane{}, false
}

// flagValue is the value of the long flag name in args, as pflag reads
// it (--name=value or --name value; the last one wins).
func flagValue(args []string, name string) (string, bool) {
	v, found := "", false
	for i := 0; i < len(args); i++ {
		a := args[i]
		if a == "--" {
			break
		}
		if rest, ok := strings.CutPrefix(a, "--"+name+"="); ok {
			v, found = rest, true
		} else if a == "--"+name && i+1 < len(args) {
			v, found = args[i+1], true
			i++
		}
	}
	return v, found
}
