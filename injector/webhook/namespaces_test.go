package webhook_test

import (
	"context"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes/fake"

	"github.com/trustmesh/trustmesh/injector/webhook"
)

// TestNamespacesReadsLabels: a namespace's labels come from the watch once
// it has seen it, from the API server before (a namespace just created),
// and a namespace that cannot be read is an error, never "no labels".
func TestNamespacesReadsLabels(t *testing.T) {
	cs := fake.NewClientset(&corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"istio.io/dataplane-mode": "ambient"}}})
	ns, err := webhook.NewNamespaces(cs)
	if err != nil {
		t.Fatal(err)
	}
	// Not running yet: read directly.
	if l, err := ns.NamespaceLabels("shop"); err != nil || l["istio.io/dataplane-mode"] != "ambient" {
		t.Fatalf("before the watch: %v, %v", l, err)
	}
	if l, err := ns.NamespaceLabels("gone"); err == nil {
		t.Fatalf("a namespace that does not exist: %v, want an error", l)
	}

	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- ns.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Error(err)
		}
	}()
	// Relabelled: the watch follows.
	if _, err := cs.CoreV1().Namespaces().Update(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop", Labels: map[string]string{"istio.io/dataplane-mode": "none"}}}, metav1.UpdateOptions{}); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		l, err := ns.NamespaceLabels("shop")
		if err == nil && l["istio.io/dataplane-mode"] == "none" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after relabelling: %v, %v", l, err)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
