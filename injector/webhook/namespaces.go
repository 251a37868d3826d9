package webhook

import (
	"context"
	"errors"
	"fmt"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/informers"
	"k8s.io/client-go/kubernetes"
	listerscorev1 "k8s.io/client-go/listers/core/v1"
	"k8s.io/client-go/tools/cache"

	"github.com/trustmesh/trustmesh/injector"
)

// Namespaces gives the injector the labels of a pod's namespace, which an
// AdmissionReview does not carry: from a watch of the API server's
// namespaces, or, for a namespace the watch has not seen yet (created a
// moment ago), from the API server itself. It reads namespaces only, which
// the control plane's RBAC allows.
type Namespaces struct {
	client   kubernetes.Interface
	informer cache.SharedIndexInformer
	lister   listerscorev1.NamespaceLister
	// Timeout bounds a direct read, within the webhook's own timeout.
	Timeout time.Duration
}

var _ injector.NamespaceLabels = (*Namespaces)(nil)

// NewNamespaces returns a Namespaces reading through client. It answers
// from the API server until Run has filled its cache.
func NewNamespaces(client kubernetes.Interface) (*Namespaces, error) {
	if client == nil {
		return nil, errors.New("webhook: namespaces: a Client is required")
	}
	ns := informers.NewSharedInformerFactory(client, 0).Core().V1().Namespaces()
	return &Namespaces{client: client, informer: ns.Informer(), lister: ns.Lister(), Timeout: 5 * time.Second}, nil
}

// Run watches namespaces until ctx ends.
func (n *Namespaces) Run(ctx context.Context) error {
	n.informer.Run(ctx.Done())
	return nil
}

// NamespaceLabels returns the labels of namespace name, or an error if it
// cannot be read: the injector then refuses the pod rather than guess.
func (n *Namespaces) NamespaceLabels(name string) (map[string]string, error) {
	if ns, err := n.lister.Get(name); err == nil {
		return ns.Labels, nil
	}
	ctx, cancel := context.WithTimeout(context.Background(), n.Timeout)
	defer cancel()
	ns, err := n.client.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if err != nil {
		return nil, fmt.Errorf("webhook: read namespace %s: %w", name, err)
	}
	return ns.Labels, nil
}
