// Package kube is the Kubernetes policy source: it watches
// AuthorizationPolicies through an informer and hands them to the loader.
//
// Kubernetes serves every AuthorizationPolicy under both
// security.istio.io/v1 and v1beta1 (one stored object, two views), so the
// source watches one version, v1 by default, and sees objects created
// through either.
package kube

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"sync"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	securityv1beta1 "istio.io/client-go/pkg/apis/security/v1beta1"
	"istio.io/client-go/pkg/clientset/versioned"
	"istio.io/client-go/pkg/informers/externalversions"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
)

// ErrNotWatching is returned by Policies before Watch has synced.
var ErrNotWatching = errors.New("kube: not watching yet")

// Source is the Kubernetes PolicySource.
type Source struct {
	Client versioned.Interface
	// Namespace limits the watch; empty watches every namespace.
	Namespace string
	// V1beta1 watches security.istio.io/v1beta1, for clusters whose Istio
	// CRDs predate v1.
	V1beta1 bool
	// Resync is the informer resync period; zero disables it.
	Resync time.Duration

	mu   sync.Mutex
	list func() ([]*policy.Policy, error)
}

var _ source.PolicySource = (*Source)(nil)

// Watch starts the informer and returns once its cache has synced.
func (s *Source) Watch(ctx context.Context, changed func()) (<-chan error, error) {
	if s.Client == nil {
		return nil, errors.New("kube: a client is required")
	}
	f := externalversions.NewSharedInformerFactoryWithOptions(s.Client, s.Resync, externalversions.WithNamespace(s.Namespace))
	handler := cache.ResourceEventHandlerFuncs{
		AddFunc:    func(any) { changed() },
		UpdateFunc: func(any, any) { changed() },
		DeleteFunc: func(any) { changed() },
	}
	var (
		inf  cache.SharedIndexInformer
		list func() ([]*policy.Policy, error)
	)
	if s.V1beta1 {
		i := f.Security().V1beta1().AuthorizationPolicies()
		inf = i.Informer()
		list = func() ([]*policy.Policy, error) {
			objs, err := i.Lister().List(labels.Everything())
			if err != nil {
				return nil, fmt.Errorf("kube: %w", err)
			}
			return convert(objs, ConvertV1beta1)
		}
	} else {
		i := f.Security().V1().AuthorizationPolicies()
		inf = i.Informer()
		list = func() ([]*policy.Policy, error) {
			objs, err := i.Lister().List(labels.Everything())
			if err != nil {
				return nil, fmt.Errorf("kube: %w", err)
			}
			return convert(objs, ConvertV1)
		}
	}
	if _, err := inf.AddEventHandler(handler); err != nil {
		return nil, fmt.Errorf("kube: %w", err)
	}
	ctx, cancel := context.WithCancel(ctx)
	f.Start(ctx.Done())
	if !cache.WaitForCacheSync(ctx.Done(), inf.HasSynced) {
		cancel()
		f.Shutdown()
		return nil, fmt.Errorf("kube: AuthorizationPolicy informer did not sync: %w", context.Cause(ctx))
	}
	s.mu.Lock()
	s.list = list
	s.mu.Unlock()
	done := make(chan error, 1)
	go func() {
		<-ctx.Done()
		f.Shutdown()
		cancel()
		done <- nil
	}()
	return done, nil
}

// Policies converts every watched AuthorizationPolicy; one that does not
// validate refuses the update, naming the object.
func (s *Source) Policies() ([]*policy.Policy, error) {
	s.mu.Lock()
	list := s.list
	s.mu.Unlock()
	if list == nil {
		return nil, ErrNotWatching
	}
	return list()
}

// ConvertV1 converts one security.istio.io/v1 AuthorizationPolicy as the
// source loads it, and makes the engine's checks of one policy
// (engine.CheckPolicy). The admission webhook calls it too, so that it
// refuses exactly what a load refuses, with the same error: joined
// *policy.FieldErrors.
func ConvertV1(o *securityv1.AuthorizationPolicy) (*policy.Policy, error) {
	p, err := policy.FromV1(o, origin("v1", o.Namespace, o.Name))
	if err == nil {
		err = engine.CheckPolicy(p)
	}
	if err != nil {
		return nil, err
	}
	return p, nil
}

// ConvertV1beta1 is ConvertV1 for security.istio.io/v1beta1.
func ConvertV1beta1(o *securityv1beta1.AuthorizationPolicy) (*policy.Policy, error) {
	p, err := policy.FromV1beta1(o, origin("v1beta1", o.Namespace, o.Name))
	if err == nil {
		err = engine.CheckPolicy(p)
	}
	if err != nil {
		return nil, err
	}
	return p, nil
}

func origin(version, ns, name string) string {
	return fmt.Sprintf("kubernetes security.istio.io/%s AuthorizationPolicy %s/%s", version, ns, name)
}

func convert[T any](objs []T, conv func(T) (*policy.Policy, error)) ([]*policy.Policy, error) {
	var (
		out  []*policy.Policy
		errs []error
	)
	for _, o := range objs {
		p, err := conv(o)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		out = append(out, p)
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Key() < out[j].Key() })
	return out, nil
}

// NewClient returns an Istio client from a kubeconfig file, or from the
// pod's service account when kubeconfig is empty.
func NewClient(kubeconfig string) (versioned.Interface, error) {
	var (
		cfg *rest.Config
		err error
	)
	if kubeconfig == "" {
		cfg, err = rest.InClusterConfig()
	} else {
		cfg, err = clientcmd.BuildConfigFromFlags("", kubeconfig)
	}
	if err != nil {
		return nil, fmt.Errorf("kube: %w", err)
	}
	c, err := versioned.NewForConfig(cfg)
	if err != nil {
		return nil, fmt.Errorf("kube: %w", err)
	}
	return c, nil
}
