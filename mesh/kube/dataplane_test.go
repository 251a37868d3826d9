package kube_test

import (
	"context"
	"net/netip"
	"slices"
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

// TestDataPlaneMode: the pod's own label decides ("none" wins), else its
// namespace's; an injected sidecar wins over both; the host network and
// the system namespaces are never captured.
func TestDataPlaneMode(t *testing.T) {
	ambientNS := map[string]string{kube.IstioLabelDataplaneMode: "ambient"}
	for name, tc := range map[string]struct {
		ns       string
		labels   map[string]string
		nsLabels map[string]string
		hostNet  bool
		want     mesh.DataPlaneMode
	}{
		"plain pod":                 {want: mesh.DataPlaneNone},
		"Istio namespace label":     {nsLabels: ambientNS, want: mesh.DataPlaneAmbient},
		"trustmesh namespace label": {nsLabels: map[string]string{kube.LabelDataplaneMode: "ambient"}, want: mesh.DataPlaneAmbient},
		"pod label":                 {labels: map[string]string{kube.LabelDataplaneMode: "ambient"}, want: mesh.DataPlaneAmbient},
		"pod opts out":              {labels: map[string]string{kube.IstioLabelDataplaneMode: "none"}, nsLabels: ambientNS, want: mesh.DataPlaneNone},
		"none wins on the pod": {labels: map[string]string{kube.LabelDataplaneMode: "ambient", kube.IstioLabelDataplaneMode: "none"},
			want: mesh.DataPlaneNone},
		"namespace none is no opt-in": {nsLabels: map[string]string{kube.LabelDataplaneMode: "none"}, want: mesh.DataPlaneNone},
		"injected sidecar":            {labels: map[string]string{kube.LabelProxy: "sidecar"}, nsLabels: ambientNS, want: mesh.DataPlaneSidecar},
		"gateway":                     {labels: map[string]string{kube.LabelProxy: "router"}, want: mesh.DataPlaneNone},
		"host network":                {hostNet: true, nsLabels: ambientNS, want: mesh.DataPlaneNone},
		"kube-system":                 {ns: "kube-system", nsLabels: ambientNS, want: mesh.DataPlaneNone},
	} {
		t.Run(name, func(t *testing.T) {
			ns := tc.ns
			if ns == "" {
				ns = "shop"
			}
			pod := &corev1.Pod{ObjectMeta: metav1.ObjectMeta{Namespace: ns, Name: "p", Labels: tc.labels},
				Spec: corev1.PodSpec{HostNetwork: tc.hostNet}}
			if got := kube.DataPlaneMode(pod, tc.nsLabels); got != tc.want {
				t.Errorf("mode %q, want %q", got, tc.want)
			}
		})
	}
}

// TestDataPlaneFromKubernetes: pods' IPs and modes reach the model from
// real objects; labelling the namespace ambient later makes its pods
// ambient (the namespace informer); a pod on the host network has no
// address; two pods claiming one IP lose it, and it is reported.
func TestDataPlaneFromKubernetes(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	restConfig := apiserver(t)
	kc := must(kubernetes.NewForConfig(restConfig))
	ic := must(istioclient.NewForConfig(restConfig))
	must(kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "amb"}}, metav1.CreateOptions{}))
	pod := func(name string, labels map[string]string, hostNet bool, ips ...string) {
		p := must(kc.CoreV1().Pods("amb").Create(ctx, &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels},
			Spec:       corev1.PodSpec{NodeName: "node-a", HostNetwork: hostNet, Containers: []corev1.Container{{Name: "c", Image: "c"}}},
		}, metav1.CreateOptions{}))
		p.Status.Phase = corev1.PodRunning
		for _, ip := range ips {
			p.Status.PodIPs = append(p.Status.PodIPs, corev1.PodIP{IP: ip})
		}
		if len(ips) > 0 {
			p.Status.PodIP = ips[0]
		}
		must(kc.CoreV1().Pods("amb").UpdateStatus(ctx, p, metav1.UpdateOptions{}))
	}
	pod("web-0", nil, false, "10.1.0.5", "fd00::5")
	pod("db-0", map[string]string{kube.IstioLabelDataplaneMode: "none"}, false, "10.1.0.6")
	pod("host-0", nil, true, "192.168.0.10")
	pod("old-0", nil, false, "10.1.0.7")
	pod("new-0", nil, false, "10.1.0.7")

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
	await := func(what string, ok func(*mesh.Mesh) bool) *mesh.Mesh {
		t.Helper()
		for {
			m := must(src.Mesh())
			if ok(m) {
				return m
			}
			select {
			case <-changes:
			case <-time.After(100 * time.Millisecond):
			case <-ctx.Done():
				t.Fatalf("the model never showed %s", what)
			}
		}
	}
	m := await("the pods' IPs", func(m *mesh.Mesh) bool {
		w := m.Workload("amb", "web-0")
		return w != nil && len(w.Addresses) == 2 && m.Workload("amb", "new-0") != nil
	})
	if err := m.Validate(spiffeid.RequireTrustDomainFromString("cluster.local")); err != nil {
		t.Fatalf("the model from Kubernetes is invalid: %v", err)
	}
	web := m.Workload("amb", "web-0")
	if !slices.Equal(web.Addresses, []string{"10.1.0.5", "fd00::5"}) || web.Mode() != mesh.DataPlaneNone {
		t.Errorf("web-0: addresses %v mode %q, want both IPs and none", web.Addresses, web.Mode())
	}
	if h := m.Workload("amb", "host-0"); len(h.Addresses) != 0 {
		t.Errorf("host-0 on the host network has addresses %v", h.Addresses)
	}
	for _, name := range []string{"old-0", "new-0"} {
		if w := m.Workload("amb", name); len(w.Addresses) != 0 {
			t.Errorf("%s keeps the shared IP: %v", name, w.Addresses)
		}
	}
	if !slices.ContainsFunc(m.Refusals, func(r mesh.Refusal) bool {
		return r.Object == "Pod amb/new-0, amb/old-0" && r.Reason == "pods share IP 10.1.0.7: none of them is reached by it until one is gone"
	}) {
		t.Errorf("refusals %v do not report the shared IP", m.Refusals)
	}

	ns := must(kc.CoreV1().Namespaces().Get(ctx, "amb", metav1.GetOptions{}))
	ns.Labels = map[string]string{kube.IstioLabelDataplaneMode: "ambient"}
	must(kc.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{}))
	m = await("web-0 ambient", func(m *mesh.Mesh) bool { return m.Workload("amb", "web-0").Mode() == mesh.DataPlaneAmbient })
	if got := m.Workload("amb", "db-0").Mode(); got != mesh.DataPlaneNone {
		t.Errorf("db-0 opted out is %q", got)
	}
	if got := m.WorkloadByAddress(netip.MustParseAddr("fd00::5")); got == nil || got.Name != "web-0" {
		t.Errorf("fd00::5 finds %v, want web-0", got)
	}
	if err := kc.CoreV1().Pods("amb").Delete(ctx, "old-0", metav1.DeleteOptions{GracePeriodSeconds: new(int64)}); err != nil {
		t.Fatal(err)
	}
	await("new-0 getting its IP back", func(m *mesh.Mesh) bool {
		return slices.Equal(m.Workload("amb", "new-0").Addresses, []string{"10.1.0.7"})
	})
}
