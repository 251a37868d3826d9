package cabundle

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listersv1 "k8s.io/client-go/listers/admissionregistration/v1"
	"k8s.io/client-go/tools/cache"
)

// WebhookConfig configures a WebhookPatcher.
type WebhookConfig struct {
	Client kubernetes.Interface
	// Name of the MutatingWebhookConfiguration; every webhook in it gets
	// the bundle.
	Name   string
	Bundle BundleSource
	Log    *slog.Logger
}

// WebhookPatcher keeps the caBundle of one MutatingWebhookConfiguration
// equal to the CA's roots.
type WebhookPatcher struct {
	cfg    WebhookConfig
	lister listersv1.MutatingWebhookConfigurationLister
	loop   *loop
}

// NewWebhookPatcher checks cfg. Nothing runs until Run.
func NewWebhookPatcher(cfg WebhookConfig) (*WebhookPatcher, error) {
	var errs []error
	if cfg.Client == nil {
		errs = append(errs, errors.New("a Client is required"))
	}
	if cfg.Name == "" {
		errs = append(errs, errors.New("the webhook configuration's Name is required"))
	}
	if cfg.Bundle == nil {
		errs = append(errs, errors.New("a Bundle is required"))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("cabundle: %w", errors.Join(errs...))
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	factory := informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("metadata.name", cfg.Name).String()
	}))
	mwc := factory.Admissionregistration().V1().MutatingWebhookConfigurations()
	p := &WebhookPatcher{cfg: cfg, lister: mwc.Lister()}
	p.loop = &loop{
		name:      "MutatingWebhookConfiguration " + cfg.Name,
		bundle:    cfg.Bundle,
		log:       cfg.Log,
		informers: []cache.SharedIndexInformer{mwc.Informer()},
		queue:     newQueue("cabundle-webhook"),
		reconcile: p.reconcile,
		all:       func() []string { return []string{cfg.Name} },
	}
	err := p.loop.enqueueOn(mwc.Informer(), func(any) (string, bool) { return cfg.Name, true })
	if err != nil {
		return nil, err
	}
	return p, nil
}

// Run keeps the caBundle current until ctx ends. A cancelled ctx is a clean
// exit.
func (p *WebhookPatcher) Run(ctx context.Context) error { return p.loop.run(ctx) }

func (p *WebhookPatcher) reconcile(ctx context.Context, name string, bundle []byte) error {
	cur, err := p.lister.Get(name)
	if apierrors.IsNotFound(err) {
		// Patched when it is created.
		return nil
	}
	if err != nil {
		return fmt.Errorf("cabundle: get %s: %w", name, err)
	}
	changed := false
	next := cur.DeepCopy()
	for i := range next.Webhooks {
		if !bytes.Equal(next.Webhooks[i].ClientConfig.CABundle, bundle) {
			next.Webhooks[i].ClientConfig.CABundle = bundle
			changed = true
		}
	}
	if !changed {
		return nil
	}
	if _, err := p.cfg.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Update(ctx, next, metav1.UpdateOptions{
		FieldManager: "trustmesh",
	}); err != nil {
		return fmt.Errorf("cabundle: update %s: %w", name, err)
	}
	p.cfg.Log.Info("published the trust bundle to the webhook configuration", "name", name, "webhooks", len(next.Webhooks))
	return nil
}
