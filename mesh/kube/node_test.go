package kube_test

import (
	"context"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/mesh/kube"
)

// TestWorkloadsOnNodeFromKubernetes: a pod's spec.nodeName and UID reach
// the model; a pod not yet scheduled is on no node until it is bound, and a
// finished pod is on no node.
func TestWorkloadsOnNodeFromKubernetes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	restConfig := apiserver(t)
	kc := must(kubernetes.NewForConfig(restConfig))
	ic := must(istioclient.NewForConfig(restConfig))
	must(kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "nodes"}}, metav1.CreateOptions{}))
	pod := func(name, sa, node string) *corev1.Pod {
		return must(kc.CoreV1().Pods("nodes").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name},
			Spec:       corev1.PodSpec{ServiceAccountName: sa, NodeName: node, Containers: []corev1.Container{{Name: "c", Image: "c"}}},
		}, metav1.CreateOptions{}))
	}
	web := pod("web-0", "web", "node-a")
	pod("db-0", "db", "node-b")
	pod("pending-0", "pending", "")
	done := pod("job-0", "job", "node-a")
	done.Status.Phase = corev1.PodSucceeded
	must(kc.CoreV1().Pods("nodes").UpdateStatus(ctx, done, metav1.UpdateOptions{}))

	src := &kube.Source{Client: kc, Istio: ic, TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local")}
	changes := make(chan struct{}, 1)
	wctx, wcancel := context.WithCancel(ctx)
	stopped, err := src.Watch(wctx, func() {
		select {
		case changes <- struct{}{}:
		default:
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		wcancel()
		if err := <-stopped; err != nil {
			t.Errorf("watch ended with %v", err)
		}
	}()
	onNode := func(m *mesh.Mesh, node string) []string {
		var names []string
		for _, w := range m.WorkloadsOnNode(node) {
			if w.Namespace == "nodes" {
				names = append(names, w.Name)
			}
		}
		return names
	}
	// await waits until node-a runs exactly want (the informers catch up).
	await := func(want ...string) *mesh.Mesh {
		t.Helper()
		for {
			m := must(src.Mesh())
			got := onNode(m, "node-a")
			if len(got) == len(want) && (len(want) == 0 || got[0] == want[0]) && (len(want) < 2 || got[1] == want[1]) {
				return m
			}
			select {
			case <-changes:
			case <-time.After(100 * time.Millisecond):
			case <-ctx.Done():
				t.Fatalf("node-a runs %v, want %v", got, want)
			}
		}
	}
	m := await("web-0")
	w := m.Workload("nodes", "web-0")
	if w.Node != "node-a" || w.UID != string(web.UID) || w.UID == "" {
		t.Fatalf("web-0 = node %q UID %q, want node-a and %q", w.Node, w.UID, web.UID)
	}
	if got := onNode(m, "node-b"); len(got) != 1 || got[0] != "db-0" {
		t.Fatalf("node-b runs %v, want [db-0]", got)
	}
	if p := m.Workload("nodes", "pending-0"); p == nil || p.Node != "" {
		t.Fatalf("pending-0 = %+v: an unscheduled pod is on no node", p)
	}

	// The scheduler binds the pending pod to node-a.
	if err := kc.CoreV1().Pods("nodes").Bind(ctx, &corev1.Binding{
		ObjectMeta: metav1.ObjectMeta{Name: "pending-0"}, Target: corev1.ObjectReference{Kind: "Node", Name: "node-a"},
	}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	await("pending-0", "web-0")
}
