// Package cabundle keeps the trustmesh CA's trust bundle current in the
// Kubernetes objects that carry it: the caBundle of the webhook
// configurations (the injector's MutatingWebhookConfiguration and the
// config validation's ValidatingWebhookConfiguration), so that the
// kube-apiserver trusts the webhooks' serving certificate, and the
// trustmesh-ca-root-cert ConfigMap in every namespace, which injected
// agents start from. For the validating webhook it also switches the
// failurePolicy from Ignore to Fail once the webhook, with that caBundle,
// is seen answering: one reconcile per object, so the two never race.
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
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"golang.org/x/time/rate"
	"k8s.io/apimachinery/pkg/labels"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/util/workqueue"

	"github.com/trustmesh/trustmesh/internal/run"
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

// newQueue is a work queue whose failed keys are retried with exponential
// backoff from 5ms up to maxDelay, and at most 10 per second overall.
func newQueue(name string, maxDelay time.Duration) workqueue.TypedRateLimitingInterface[string] {
	limiter := workqueue.NewTypedMaxOfRateLimiter(
		workqueue.NewTypedItemExponentialFailureRateLimiter[string](5*time.Millisecond, maxDelay),
		&workqueue.TypedBucketRateLimiter[string]{Limiter: rate.NewLimiter(rate.Limit(10), 100)},
	)
	return workqueue.NewTypedRateLimitingQueueWithConfig(limiter, workqueue.TypedRateLimitingQueueConfig[string]{Name: name})
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
	defer l.queue.ShutDown()
	tasks := []run.Task{l.work}
	for _, inf := range l.informers {
		tasks = append(tasks, func(ctx context.Context) error { inf.RunWithContext(ctx); return nil })
	}
	err := run.Tasks(ctx, tasks...)
	if err != nil && !errors.Is(err, context.Canceled) {
		return fmt.Errorf("cabundle: %s: %w", l.name, err)
	}
	return nil
}

// work waits for the informers' caches, then queues every key whenever the
// bundle changes and reconciles queued keys, until ctx ends.
func (l *loop) work(ctx context.Context) error {
	syncs := make([]cache.InformerSynced, len(l.informers))
	for i, inf := range l.informers {
		syncs[i] = inf.HasSynced
	}
	if !cache.WaitForCacheSync(ctx.Done(), syncs...) {
		return ctx.Err()
	}
	requeue := func(ctx context.Context) error {
		for {
			_, changed := l.bundle.Bundle()
			for _, k := range l.all() {
				l.queue.Add(k)
			}
			select {
			case <-changed:
			case <-ctx.Done():
				return nil
			}
		}
	}
	reconcile := func(ctx context.Context) error {
		for l.next(ctx) {
		}
		return nil
	}
	stop := func(ctx context.Context) error {
		<-ctx.Done()
		l.queue.ShutDown() // lets reconcile's Get return
		return nil
	}
	return run.Tasks(ctx, requeue, reconcile, stop)
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
			l.log.Warn("could not bring it up to date; retrying", "object", l.name, "key", key, "error", err)
			l.queue.AddRateLimited(key)
		}
		return true
	}
	l.queue.Forget(key)
	return true
}

var everything = labels.Everything()
