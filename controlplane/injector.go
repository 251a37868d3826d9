package controlplane

import (
	"fmt"
	"net/http"

	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/injector/cabundle"
	"github.com/trustmesh/trustmesh/injector/webhook"
)

// newInjector assembles the sidecar-injection webhook's handler, which
// newWebhooks serves; the control plane keeps the webhook configuration's
// caBundle, and the root certificate ConfigMap that injected pods read,
// current across rotation.
func (cp *ControlPlane) newInjector(v *validated) (http.Handler, error) {
	mesh, err := injector.LoadMeshConfig(v.Injector.MeshConfig)
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	// The namespaces' labels, which put their pods in ambient mode.
	namespaces, err := webhook.NewNamespaces(cp.cluster.kube)
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	inj, err := injector.New(injector.Config{Mesh: mesh, Namespaces: namespaces})
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	h, err := webhook.NewHandler(webhook.HandlerConfig{Injector: inj, Registerer: cp.registry, Log: v.Log})
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	client := cp.cluster.kube
	patcher, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{Client: client, Name: v.Injector.WebhookConfig, Bundle: cp.authority, Log: v.Log})
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	publisher, err := cabundle.NewRootCertPublisher(cabundle.RootCertConfig{Client: client, Bundle: cp.authority, Log: v.Log})
	if err != nil {
		return nil, fmt.Errorf("controlplane: %w", err)
	}
	cp.bundleFns = append(cp.bundleFns, patcher.Run, publisher.Run, namespaces.Run)
	return h, nil
}
