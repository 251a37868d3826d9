package cabundle

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"time"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/cache"
)

// Kind is the kind of webhook configuration a WebhookPatcher keeps.
type Kind int

const (
	// Mutating is a MutatingWebhookConfiguration (the injector's).
	Mutating Kind = iota
	// Validating is a ValidatingWebhookConfiguration (config validation).
	Validating
)

func (k Kind) String() string {
	switch k {
	case Mutating:
		return "MutatingWebhookConfiguration"
	case Validating:
		return "ValidatingWebhookConfiguration"
	}
	return fmt.Sprintf("Kind(%d)", int(k))
}

// WebhookConfig configures a WebhookPatcher.
type WebhookConfig struct {
	Client kubernetes.Interface
	// Kind of the configuration; the zero value is Mutating.
	Kind Kind
	// Name of the webhook configuration; every webhook in it gets the
	// bundle.
	Name   string
	Bundle BundleSource
	// FailClose, when set, switches the webhooks whose failurePolicy is
	// Ignore to Fail, as Istio's validation controller does, once the
	// caBundle is in place and the probe shows a webhook of this
	// configuration answering: it denies the probe, quoting the probe's
	// token, which only the webhook of this process knows. Until
	// then the policy stays Ignore (a chart installs it so, so that its
	// own objects cannot deadlock the install), and every failed probe is
	// logged with its reason and retried. Fail is never switched back.
	FailClose *Probe
	Log       *slog.Logger
}

// Probe is an object that the webhook must refuse. It is created with
// dryRun=All, so that nothing is ever stored, and must come back denied by
// one of the configuration's webhooks with a message that quotes Token.
type Probe struct {
	Client   dynamic.Interface
	Resource schema.GroupVersionResource
	// Object names its namespace, which must exist and be one the
	// webhooks' namespaceSelector covers. It carries Token where only the
	// webhook this probe is for looks for it.
	Object *unstructured.Unstructured
	// Token is a secret of this process that its own webhook quotes in its
	// denial of Object. A denial without it comes from some other webhook,
	// perhaps another configuration's of the same name, and is no sign that
	// this configuration's webhook answers.
	Token string
}

// maxProbeDelay caps the retry delay of a failed update or probe, so that a
// webhook that comes up late is switched to Fail within this long.
const maxProbeDelay = 30 * time.Second

// WebhookPatcher keeps the caBundle of one webhook configuration equal to
// the CA's roots and, with FailClose, its failurePolicy at Fail once the
// webhook answers.
type WebhookPatcher struct {
	cfg     WebhookConfig
	indexer cache.Indexer
	loop    *loop
}

// NewWebhookPatcher checks cfg. Nothing runs until Run.
func NewWebhookPatcher(cfg WebhookConfig) (*WebhookPatcher, error) {
	var errs []error
	if cfg.Client == nil {
		errs = append(errs, errors.New("a Client is required"))
	}
	if cfg.Kind != Mutating && cfg.Kind != Validating {
		errs = append(errs, fmt.Errorf("unknown webhook configuration kind %v", cfg.Kind))
	}
	if cfg.Name == "" {
		errs = append(errs, errors.New("the webhook configuration's Name is required"))
	}
	if cfg.Bundle == nil {
		errs = append(errs, errors.New("a Bundle is required"))
	}
	if p := cfg.FailClose; p != nil && (p.Client == nil || p.Object == nil || p.Resource.Resource == "" || p.Token == "") {
		errs = append(errs, errors.New("the FailClose probe needs a Client, a Resource, an Object and a Token"))
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
	var inf cache.SharedIndexInformer
	if cfg.Kind == Validating {
		inf = factory.Admissionregistration().V1().ValidatingWebhookConfigurations().Informer()
	} else {
		inf = factory.Admissionregistration().V1().MutatingWebhookConfigurations().Informer()
	}
	p := &WebhookPatcher{cfg: cfg, indexer: inf.GetIndexer()}
	p.loop = &loop{
		name:      cfg.Kind.String() + " " + cfg.Name,
		bundle:    cfg.Bundle,
		log:       cfg.Log,
		informers: []cache.SharedIndexInformer{inf},
		queue:     newQueue("cabundle-webhook", maxProbeDelay),
		reconcile: p.reconcile,
		all:       func() []string { return []string{cfg.Name} },
	}
	if err := p.loop.enqueueOn(inf, func(any) (string, bool) { return cfg.Name, true }); err != nil {
		return nil, err
	}
	return p, nil
}

// Run keeps the webhook configuration current until ctx ends. A cancelled
// ctx is a clean exit.
func (p *WebhookPatcher) Run(ctx context.Context) error { return p.loop.run(ctx) }

// hooks is a copy of a webhook configuration of either kind, seen as what
// the patcher writes: each webhook's name, client config and failure
// policy.
type hooks struct {
	names    []string
	clients  []*admissionregistrationv1.WebhookClientConfig
	policies []**admissionregistrationv1.FailurePolicyType
	update   func(ctx context.Context) error
}

// get returns a copy of the configuration from the informer's cache, or
// nil when it does not exist.
func (p *WebhookPatcher) get(name string) (*hooks, error) {
	obj, exists, err := p.indexer.GetByKey(name)
	if err != nil {
		return nil, fmt.Errorf("cabundle: get %s %s: %w", p.cfg.Kind, name, err)
	}
	if !exists {
		return nil, nil
	}
	opts := metav1.UpdateOptions{FieldManager: "trustmesh"}
	h := &hooks{}
	switch cur := obj.(type) {
	case *admissionregistrationv1.MutatingWebhookConfiguration:
		next := cur.DeepCopy()
		for i := range next.Webhooks {
			w := &next.Webhooks[i]
			h.names, h.clients, h.policies = append(h.names, w.Name), append(h.clients, &w.ClientConfig), append(h.policies, &w.FailurePolicy)
		}
		h.update = func(ctx context.Context) error {
			_, err := p.cfg.Client.AdmissionregistrationV1().MutatingWebhookConfigurations().Update(ctx, next, opts)
			return err
		}
	case *admissionregistrationv1.ValidatingWebhookConfiguration:
		next := cur.DeepCopy()
		for i := range next.Webhooks {
			w := &next.Webhooks[i]
			h.names, h.clients, h.policies = append(h.names, w.Name), append(h.clients, &w.ClientConfig), append(h.policies, &w.FailurePolicy)
		}
		h.update = func(ctx context.Context) error {
			_, err := p.cfg.Client.AdmissionregistrationV1().ValidatingWebhookConfigurations().Update(ctx, next, opts)
			return err
		}
	default:
		return nil, fmt.Errorf("cabundle: %s %s: unexpected object %T", p.cfg.Kind, name, obj)
	}
	return h, nil
}

func (p *WebhookPatcher) reconcile(ctx context.Context, name string, bundle []byte) error {
	h, err := p.get(name)
	if err != nil {
		return err
	}
	if h == nil {
		// Patched when it is created.
		return nil
	}
	changed := false
	for _, c := range h.clients {
		if !bytes.Equal(c.CABundle, bundle) {
			c.CABundle = bundle
			changed = true
		}
	}
	if changed {
		if err := h.update(ctx); err != nil {
			return fmt.Errorf("cabundle: update %s %s: %w", p.cfg.Kind, name, err)
		}
		// The update comes back through the informer, which queues the
		// name again: the probe then runs against this bundle.
		p.cfg.Log.Info("published the trust bundle to the webhook configuration", "kind", p.cfg.Kind.String(), "name", name, "webhooks", len(h.clients))
		return nil
	}
	if p.cfg.FailClose == nil {
		return nil
	}
	var ignoring []**admissionregistrationv1.FailurePolicyType
	for _, fp := range h.policies {
		if *fp != nil && **fp == admissionregistrationv1.Ignore {
			ignoring = append(ignoring, fp)
		}
	}
	if len(ignoring) == 0 {
		return nil
	}
	if err := p.probe(ctx, h.names); err != nil {
		return fmt.Errorf("cabundle: %s %s: failurePolicy stays Ignore: %w", p.cfg.Kind, name, err)
	}
	fail := admissionregistrationv1.Fail
	for _, fp := range ignoring {
		*fp = &fail
	}
	if err := h.update(ctx); err != nil {
		return fmt.Errorf("cabundle: switch %s %s to failurePolicy Fail: %w", p.cfg.Kind, name, err)
	}
	p.cfg.Log.Info("the webhook answers: switched its failurePolicy from Ignore to Fail", "kind", p.cfg.Kind.String(), "name", name, "webhooks", len(ignoring))
	return nil
}

// probe creates the probe object with dryRun=All and returns nil only if
// one of the named webhooks denied it, quoting the probe's token. The API
// server reports a webhook's denial only in the status message, as
// `admission webhook "NAME" denied the request: ...`; a webhook it could
// not call is "failed calling webhook", and with failurePolicy Ignore not
// an error at all. Webhook names are unique only within a configuration,
// so the name alone does not show that the denial is ours: another
// configuration's webhook of the same name, which the probe also reaches,
// denies it too, but cannot know the token.
func (p *WebhookPatcher) probe(ctx context.Context, webhooks []string) error {
	pr := p.cfg.FailClose
	obj := pr.Object.DeepCopy()
	_, err := pr.Client.Resource(pr.Resource).Namespace(obj.GetNamespace()).Create(ctx, obj, metav1.CreateOptions{
		DryRun: []string{metav1.DryRunAll}, FieldManager: "trustmesh",
	})
	if err == nil {
		return fmt.Errorf("the dry-run probe %s %s/%s was admitted: the webhook did not answer (down, unreachable, or not trusting its caBundle)",
			pr.Resource.Resource, obj.GetNamespace(), obj.GetName())
	}
	var status apierrors.APIStatus
	if errors.As(err, &status) {
		msg := status.Status().Message
		for _, n := range webhooks {
			if strings.HasPrefix(msg, fmt.Sprintf("admission webhook %q denied the request", n)) && strings.Contains(msg, pr.Token) {
				return nil
			}
		}
		if strings.Contains(msg, "denied the request") {
			// Never log the token itself: it is what the denial must
			// prove knowledge of.
			msg = strings.ReplaceAll(msg, pr.Token, "TOKEN")
			return fmt.Errorf("the dry-run probe %s %s/%s was denied, but not by this process's webhook (no denial quotes its probe token): %s",
				pr.Resource.Resource, obj.GetNamespace(), obj.GetName(), msg)
		}
	}
	return fmt.Errorf("the dry-run probe %s %s/%s was not denied by the webhook: %w", pr.Resource.Resource, obj.GetNamespace(), obj.GetName(), err)
}
