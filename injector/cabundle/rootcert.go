package cabundle

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"time"

	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/fields"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/trustmesh/trustmesh/injector"
)

// RootCertConfig configures a RootCertPublisher.
type RootCertConfig struct {
	Client kubernetes.Interface
	Bundle BundleSource
	// Skip are namespaces not published to; default kube-system,
	// kube-public and kube-node-lease, where nothing is injected.
	Skip []string
	Log  *slog.Logger
}

// ManagedByLabel marks the ConfigMaps the publisher owns.
const ManagedByLabel = "app.kubernetes.io/managed-by"

// RootCertPublisher writes the trust bundle into the ConfigMap
// injector.RootCertConfigMap, key injector.RootCertKey, in every
// namespace, as istiod does with istio-ca-root-cert. Every namespace gets
// it, not only those labelled for injection, because a pod can opt in on
// its own when Istio compatibility is on. The bundle holds only public
// certificates.
type RootCertPublisher struct {
	cfg        RootCertConfig
	namespaces listerscorev1.NamespaceLister
	configMaps listerscorev1.ConfigMapLister
	loop       *loop
}

// NewRootCertPublisher checks cfg. Nothing runs until Run.
func NewRootCertPublisher(cfg RootCertConfig) (*RootCertPublisher, error) {
	var errs []error
	if cfg.Client == nil {
		errs = append(errs, errors.New("a Client is required"))
	}
	if cfg.Bundle == nil {
		errs = append(errs, errors.New("a Bundle is required"))
	}
	if len(errs) > 0 {
		return nil, fmt.Errorf("cabundle: %w", errors.Join(errs...))
	}
	if cfg.Skip == nil {
		cfg.Skip = []string{"kube-system", "kube-public", "kube-node-lease"}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	nsFactory := informers.NewSharedInformerFactory(cfg.Client, 0)
	cmFactory := informers.NewSharedInformerFactoryWithOptions(cfg.Client, 0, informers.WithTweakListOptions(func(o *metav1.ListOptions) {
		o.FieldSelector = fields.OneTermEqualSelector("metadata.name", injector.RootCertConfigMap).String()
	}))
	ns := nsFactory.Core().V1().Namespaces()
	cm := cmFactory.Core().V1().ConfigMaps()
	p := &RootCertPublisher{cfg: cfg, namespaces: ns.Lister(), configMaps: cm.Lister()}
	p.loop = &loop{
		name:      "ConfigMap " + injector.RootCertConfigMap,
		bundle:    cfg.Bundle,
		log:       cfg.Log,
		informers: []cache.SharedIndexInformer{ns.Informer(), cm.Informer()},
		queue:     newQueue("cabundle-rootcert", 1000*time.Second),
		reconcile: p.reconcile,
		all:       p.all,
	}
	if err := p.loop.enqueueOn(ns.Informer(), func(obj any) (string, bool) {
		n, ok := obj.(*corev1.Namespace)
		return nameOf(n, ok)
	}); err != nil {
		return nil, err
	}
	if err := p.loop.enqueueOn(cm.Informer(), func(obj any) (string, bool) {
		c, ok := obj.(*corev1.ConfigMap)
		if !ok {
			return "", false
		}
		return c.Namespace, true
	}); err != nil {
		return nil, err
	}
	return p, nil
}

func nameOf(n *corev1.Namespace, ok bool) (string, bool) {
	if !ok {
		return "", false
	}
	return n.Name, true
}

// Run keeps the ConfigMaps current until ctx ends. A cancelled ctx is a
// clean exit.
func (p *RootCertPublisher) Run(ctx context.Context) error { return p.loop.run(ctx) }

func (p *RootCertPublisher) all() []string {
	list, err := p.namespaces.List(everything)
	if err != nil {
		return nil
	}
	names := make([]string, 0, len(list))
	for _, n := range list {
		names = append(names, n.Name)
	}
	return names
}

func (p *RootCertPublisher) reconcile(ctx context.Context, namespace string, bundle []byte) error {
	if slices.Contains(p.cfg.Skip, namespace) {
		return nil
	}
	ns, err := p.namespaces.Get(namespace)
	if apierrors.IsNotFound(err) || (err == nil && ns.Status.Phase == corev1.NamespaceTerminating) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cabundle: get namespace %s: %w", namespace, err)
	}
	want := map[string]string{injector.RootCertKey: string(bundle)}
	client := p.cfg.Client.CoreV1().ConfigMaps(namespace)
	cur, err := p.configMaps.ConfigMaps(namespace).Get(injector.RootCertConfigMap)
	switch {
	case apierrors.IsNotFound(err):
		_, err = client.Create(ctx, &corev1.ConfigMap{
			ObjectMeta: metav1.ObjectMeta{
				Name: injector.RootCertConfigMap, Namespace: namespace,
				Labels: map[string]string{ManagedByLabel: "trustmesh"},
			},
			Data: want,
		}, metav1.CreateOptions{FieldManager: "trustmesh"})
		if apierrors.IsAlreadyExists(err) || apierrors.IsForbidden(err) && isTerminating(err) {
			// The informer will catch up and queue it again.
			return nil
		}
	case err != nil:
		return fmt.Errorf("cabundle: get ConfigMap %s/%s: %w", namespace, injector.RootCertConfigMap, err)
	case cur.Data[injector.RootCertKey] == want[injector.RootCertKey] && len(cur.Data) == 1 && len(cur.BinaryData) == 0:
		return nil
	default:
		next := cur.DeepCopy()
		next.Data, next.BinaryData = want, nil
		if next.Labels == nil {
			next.Labels = map[string]string{}
		}
		next.Labels[ManagedByLabel] = "trustmesh"
		_, err = client.Update(ctx, next, metav1.UpdateOptions{FieldManager: "trustmesh"})
	}
	if err != nil {
		return fmt.Errorf("cabundle: write ConfigMap %s/%s: %w", namespace, injector.RootCertConfigMap, err)
	}
	p.cfg.Log.Debug("published the trust bundle", "namespace", namespace, "configmap", injector.RootCertConfigMap)
	return nil
}

// isTerminating reports the refusal to create in a namespace being deleted.
func isTerminating(err error) bool {
	return apierrors.HasStatusCause(err, corev1.NamespaceTerminatingCause)
}
