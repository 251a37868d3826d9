package controlplane

import (
	"fmt"

	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
)

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

func kubeClient(cfg *rest.Config, kubeconfig string) (kubernetes.Interface, error) {
	cfg, err := restConfig(cfg, kubeconfig)
	if err != nil {
		return nil, err
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("controlplane: Kubernetes client: %w", err)
	}
	return client, nil
}
