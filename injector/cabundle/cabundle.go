// Package cabundle keeps the trustmesh CA's trust bundle current in the
// Kubernetes objects that carry it: the caBundle of the injection webhook's
// MutatingWebhookConfiguration, so that the kube-apiserver trusts the
// webhook's serving certificate, and the trustmesh-ca-root-cert ConfigMap
// in every namespace, which injected agents start from.
//
// Both follow the CA's bundle, so a rotation reaches them as soon as the
// new root is in the bundle, before anything is signed under it; and both
// watch the objects they write, so an edit (a `helm upgrade` resetting the
// caBundle, a deleted ConfigMap) is undone at once.
package cabundle

import (
	"bytes"
	"context"
	"encoding/pem"
	"errors"
	"fmt"
	"log/slog"
	"sync"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"
)

// BundleSource is the CA's trust bundle: the current one, and a channel
// closed when it is replaced. *authority.Authority implements it.
type BundleSource interface {
	Bundle() (*spiffebundle.Bundle, <-chan struct{})
}

// PEM returns the bundle's X.509 roots as PEM, in the bundle's order.
func PEM(b *spiffebundle.Bundle) ([]byte, error) {
	roots := b.X509Authorities()
	if len(roots) == 0 {
		return nil, errors.New("cabundle: the trust bundle has no X.509 roots")
	}
	var buf bytes.Buffer
	for _, c := range roots {
		if err := pem.Encode(&buf, &pem.Block{Type: "CERTIFICATE", Bytes: c.Raw}); err != nil {
			return nil, fmt.Errorf("cabundle: encode root: %w", err)
		}
	}
	return buf.Bytes(), nil
}

// loop runs informers and a work queue of keys, reconciling each key with
// the current bundle, and re-queues keys from all() whenever the bundle
// changes. Failed keys are retried with the queue's rate limiter.
type loop struct {
	name      string
	bundle    BundleSource
	log       *slog.Logger
	informers []cache.SharedIndexInformer
	queue     workqueue.TypedRateLimitingInterface[string]
	reconcile func(ctx context.Context, key string, pem []byte) error
	all       func() []string
}

func newQueue(name string) workqueue.TypedRateLimitingInterface[string] {
	return workqueue.NewTypedRateLimitingQueueWithConfig(workqueue.DefaultTypedControllerRateLimiter[string](),
		workqueue.TypedRateLimitingQueueConfig[string]{Name: name})
}

// enqueueOn adds a handler to inf that queues key(obj) on every event.
func (l *loop) enqueueOn(inf cache.SharedIndexInformer, key func(obj any) (string, bool)) error {
	add := func(obj any) {
		if tomb, ok := obj.(cache.DeletedFinalStateUnknown); ok {
			obj = tomb.Obj
		}
		if k, ok := key(obj); ok {
			l.queue.Add(k)
		}
	}
	_, err := inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
		AddFunc:    add,
		UpdateFunc: func(_, obj any) { add(obj) },
		DeleteFunc: add,
	})
	if err != nil {
		return fmt.Errorf("cabundle: %s: add event handler: %w", l.name, err)
	}
	return nil
}

func (l *loop) run(ctx context.Context) error {
	ctx, cancel := context.WithCancel(ctx)
	var wg sync.WaitGroup
	defer func() {
		cancel()
		l.queue.ShutDown()
		wg.Wait()
	}()
	for _, inf := range l.informers {
		wg.Add(1)
		go func() { defer wg.Done(); inf.RunWithContext(ctx) }()
	}
	syncs := make([]cache.InformerSynced, len(l.informers))
	for i, inf := range l.informers {
		syncs[i] = inf.HasSynced
	}
	if !cache.WaitForCacheSync(ctx.Done(), syncs...) {
		if err := context.Cause(ctx); err != nil && !errors.Is(err, context.Canceled) {
			return fmt.Errorf("cabundle: %s: %w", l.name, err)
		}
		return nil
	}
	wg.Add(1)
	go func() {
		defer wg.Done()
		for {
			_, changed := l.bundle.Bundle()
			for _, k := range l.all() {
				l.queue.Add(k)
			}
			select {
			case <-changed:
			case <-ctx.Done():
				return
			}
		}
	}()
	wg.Add(1)
	go func() {
		defer wg.Done()
		for l.next(ctx) {
		}
	}()
	<-ctx.Done()
	return nil
}

func (l *loop) next(ctx context.Context) bool {
	key, quit := l.queue.Get()
	if quit {
		return false
	}
	defer l.queue.Done(key)
	b, _ := l.bundle.Bundle()
	data, err := PEM(b)
	if err == nil {
		err = l.reconcile(ctx, key, data)
	}
	if err != nil {
		if ctx.Err() == nil {
			l.log.Warn("could not publish the trust bundle; retrying", "to", l.name, "key", key, "error", err)
			l.queue.AddRateLimited(key)
		}
		return true
	}
	l.queue.Forget(key)
	return true
}

var everything = labels.Everything()
