package controlplane

import (
	"fmt"
	"net/http"
	"os"

	"istio.io/client-go/pkg/clientset/versioned"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

// Kubernetes modes.
const (
	KubernetesAuto = "auto" // on when in a cluster or given a kubeconfig
	KubernetesOn   = "on"
	KubernetesOff  = "off"
)

// KubernetesConfig says whether and how the control plane reaches a
// Kubernetes API server.
type KubernetesConfig struct {
	// Mode is "auto", "on" or "off".
	Mode       string
	Kubeconfig string
	// RestConfig, when set, is used instead of Kubeconfig or the in-cluster
	// configuration (for embedding and tests).
	RestConfig *rest.Config
}

func (c *KubernetesConfig) setDefaults() {
	if c.Mode == "" {
		c.Mode = KubernetesAuto
	}
}

// enabled reports whether the control plane uses Kubernetes.
func (c *KubernetesConfig) enabled() (bool, error) {
	switch c.Mode {
	case KubernetesOn:
		return true, nil
	case KubernetesOff:
		return false, nil
	case KubernetesAuto:
		return c.RestConfig != nil || c.Kubeconfig != "" || os.Getenv("KUBERNETES_SERVICE_HOST") != "", nil
	}
	return false, fmt.Errorf("kubernetes mode %q is not auto, on or off", c.Mode)
}

// cluster is the control plane's connection to the Kubernetes API server,
// built once per start and handed to every component that needs it: one
// client configuration, one HTTP transport, and the Kubernetes and Istio
// clients on it.
type cluster struct {
	kube  kubernetes.Interface
	istio versioned.Interface
	// rest and http build further clients on the same transport.
	rest *rest.Config
	http *http.Client
}

func newCluster(c KubernetesConfig) (*cluster, error) {
	cfg, err := restConfig(c.RestConfig, c.Kubeconfig)
	if err != nil {
		return nil, err
	}
	cfg = rest.CopyConfig(cfg)
	if cfg.UserAgent == "" {
		cfg.UserAgent = rest.DefaultKubernetesUserAgent()
	}
	httpClient, err := rest.HTTPClientFor(cfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: Kubernetes HTTP client: %w", err)
	}
	kube, err := kubernetes.NewForConfigAndClient(cfg, httpClient)
	if err != nil {
		return nil, fmt.Errorf("controlplane: Kubernetes client: %w", err)
	}
	istio, err := versioned.NewForConfigAndClient(cfg, httpClient)
	if err != nil {
		return nil, fmt.Errorf("controlplane: Istio client: %w", err)
	}
	return &cluster{kube: kube, istio: istio, rest: cfg, http: httpClient}, nil
}

func restConfig(cfg *rest.Config, kubeconfig string) (*rest.Config, error) {
	var err error
	switch {
	case cfg != nil:
	case kubeconfig != "":
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	default:
		cfg, err = rest.InClusterConfig()
	}
	if err != nil {
		return nil, fmt.Errorf("controlplane: Kubernetes client configuration: %w", err)
	}
	return cfg, nil
}
