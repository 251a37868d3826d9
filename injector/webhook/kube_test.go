package webhook_test

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/util/intstr"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/discovery"
	"k8s.io/client-go/discovery/cached/memory"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/restmapper"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/ca"
	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/server"
	"github.com/trustmesh/trustmesh/deploy"
	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/injector/cabundle"
	"github.com/trustmesh/trustmesh/injector/webhook"
)

var td = spiffeid.RequireTrustDomainFromString("cluster.local")

// trustmeshCA is a real trustmesh CA, as the control plane runs it.
func trustmeshCA(t *testing.T) (*ca.CA, *authority.Authority) {
	t.Helper()
	ctx := context.Background()
	dir := t.TempDir()
	m, err := authority.Generate(ctx, td, time.Now(), 0)
	if err != nil {
		t.Fatal(err)
	}
	_, key, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, _, err := journal.NewCheckpointSigner("trustmesh.journal/test", key)
	if err != nil {
		t.Fatal(err)
	}
	store, err := journal.Open(ctx, journal.Config{DSN: filepath.Join(dir, "journal.db"), Signer: signer})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { store.Close() })
	auth := authority.New(td, m)
	c, err := ca.New(ca.Config{TrustDomain: td, Authority: auth, Recorder: store, Clock: clock.RealClock{}})
	if err != nil {
		t.Fatal(err)
	}
	return c, auth
}

// run runs fn until the test ends and checks that it stopped cleanly.
func run(t *testing.T, name string, fn func(context.Context) error) {
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- fn(ctx) }()
	t.Cleanup(func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("%s: %v", name, err)
		}
	})
}

// chartWebhook is the chart's MutatingWebhookConfiguration, with its
// ambient profile on, pointed at url instead of the in-cluster Service,
// without a caBundle.
func chartWebhook(t *testing.T, url string) *admissionregistrationv1.MutatingWebhookConfiguration {
	t.Helper()
	objs, err := deploy.Render(deploy.RenderOptions{Values: map[string]any{"ambient": map[string]any{"enabled": true}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, o := range objs {
		if o.GetKind() != "MutatingWebhookConfiguration" {
			continue
		}
		var mwc admissionregistrationv1.MutatingWebhookConfiguration
		if err := runtime.DefaultUnstructuredConverter.FromUnstructured(o.Object, &mwc); err != nil {
			t.Fatal(err)
		}
		for i := range mwc.Webhooks {
			mwc.Webhooks[i].ClientConfig = admissionregistrationv1.WebhookClientConfig{URL: &url}
		}
		return &mwc
	}
	t.Fatal("the chart has no MutatingWebhookConfiguration")
	return nil
}

// waitFor watches obj's kind until done says yes about the object named
// name, or the deadline passes.
func waitFor[T runtime.Object](t *testing.T, w watch.Interface, done func(T) bool) {
	t.Helper()
	defer w.Stop()
	timeout := time.After(30 * time.Second)
	for {
		select {
		case ev, ok := <-w.ResultChan():
			if !ok {
				t.Fatal("watch closed")
			}
			if obj, ok := ev.Object.(T); ok && done(obj) {
				return
			}
		case <-timeout:
			t.Fatal("timed out waiting")
		}
	}
}

func namespace(t *testing.T, cs kubernetes.Interface, name string, labels map[string]string) {
	t.Helper()
	ctx := context.Background()
	ns, err := cs.CoreV1().Namespaces().Get(ctx, name, metav1.GetOptions{})
	if apierrors.IsNotFound(err) {
		_, err = cs.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: name, Labels: labels}}, metav1.CreateOptions{})
	} else if err == nil {
		if ns.Labels == nil {
			ns.Labels = map[string]string{}
		}
		for k, v := range labels {
			ns.Labels[k] = v
		}
		_, err = cs.CoreV1().Namespaces().Update(ctx, ns, metav1.UpdateOptions{})
	}
	if err != nil {
		t.Fatal(err)
	}
}

// TestWebhookInAPIServer registers the webhook, served over TLS on
// loopback with a certificate from a real trustmesh CA, in a real
// kube-apiserver with the chart's MutatingWebhookConfiguration, whose
// caBundle the control plane's patcher fills in.
func TestWebhookInAPIServer(t *testing.T) {
	cfg := kube(t)
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctx := context.Background()

	issuer, auth := trustmeshCA(t)
	serving, err := server.NewServingCert(ctx, server.ServingCertConfig{
		Issuer: issuer, ID: spiffeid.RequireFromPath(td, "/ns/trustmesh-system/sa/trustmesh"),
		IPs: []net.IP{net.IPv4(127, 0, 0, 1)},
	})
	if err != nil {
		t.Fatal(err)
	}
	namespaces, err := webhook.NewNamespaces(cs)
	if err != nil {
		t.Fatal(err)
	}
	run(t, "namespaces", namespaces.Run)
	inj, err := injector.New(injector.Config{Namespaces: namespaces})
	if err != nil {
		t.Fatal(err)
	}
	handler, err := webhook.NewHandler(webhook.HandlerConfig{Injector: inj})
	if err != nil {
		t.Fatal(err)
	}
	srv, err := webhook.New(webhook.Config{Address: "127.0.0.1:0", Handler: handler, GetCertificate: serving.GetCertificate})
	if err != nil {
		t.Fatal(err)
	}
	run(t, "webhook server", srv.Run)

	mwc := chartWebhook(t, fmt.Sprintf("https://%s%s", srv.Addr(), webhook.Path))
	mwc.Name = "trustmesh-test-injector"
	w, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Watch(ctx, metav1.ListOptions{FieldSelector: "metadata.name=" + mwc.Name})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Create(ctx, mwc, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cs.AdmissionregistrationV1().MutatingWebhookConfigurations().Delete(context.Background(), mwc.Name, metav1.DeleteOptions{})
	})
	patcher, err := cabundle.NewWebhookPatcher(cabundle.WebhookConfig{Client: cs, Name: mwc.Name, Bundle: auth})
	if err != nil {
		t.Fatal(err)
	}
	run(t, "caBundle patcher", patcher.Run)
	b, _ := auth.Bundle()
	want, err := cabundle.PEM(b)
	if err != nil {
		t.Fatal(err)
	}
	waitFor(t, w, func(m *admissionregistrationv1.MutatingWebhookConfiguration) bool {
		return string(m.Webhooks[0].ClientConfig.CABundle) == string(want)
	})

	enabled := map[string]string{injector.LabelInjection: "enabled"}
	namespace(t, cs, "shop", enabled)
	namespace(t, cs, "plain", nil)
	// Labelled, but never injected.
	namespace(t, cs, "trustmesh-system", enabled)
	namespace(t, cs, "kube-system", enabled)
	// Ambient, with and without the injection label.
	namespace(t, cs, "ambient-shop", map[string]string{injector.LabelInjection: "enabled", injector.IstioLabelDataplaneMode: "ambient"})
	namespace(t, cs, "ambient-plain", map[string]string{injector.LabelDataplaneMode: "ambient"})
	socket := func(p *corev1.Pod) {
		p.Annotations = map[string]string{injector.AnnotationWorkloadAPI: injector.WorkloadAPINode}
	}
	label := func(k, v string) func(*corev1.Pod) { return func(p *corev1.Pod) { p.Labels[k] = v } }

	app := func(ns string, mutate func(*corev1.Pod)) *corev1.Pod {
		p := &corev1.Pod{
			ObjectMeta: metav1.ObjectMeta{GenerateName: "web-", Namespace: ns, Labels: map[string]string{"app": "web"}},
			Spec: corev1.PodSpec{
				ServiceAccountName: "default", AutomountServiceAccountToken: new(bool),
				Containers: []corev1.Container{{
					Name: "web", Image: "registry.example/web:1",
					Ports: []corev1.ContainerPort{{Name: "http", ContainerPort: 8080}},
					ReadinessProbe: &corev1.Probe{ProbeHandler: corev1.ProbeHandler{
						HTTPGet: &corev1.HTTPGetAction{Path: "/ready", Port: intstr.FromString("http")}}},
				}},
			},
		}
		if mutate != nil {
			mutate(p)
		}
		return p
	}
	for _, tc := range []struct {
		name    string
		pod     *corev1.Pod
		inject  bool
		socket  bool // the node agent's Workload API, and nothing else
		refused injector.Code
	}{
		{name: "enabled namespace", pod: app("shop", nil), inject: true},
		{name: "other namespace", pod: app("plain", nil)},
		{name: "own namespace", pod: app("trustmesh-system", nil)},
		{name: "kube-system", pod: app("kube-system", nil)},
		{name: "opted out by annotation", pod: app("shop", func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.InjectKey: "false"}
		})},
		{name: "opted out by label", pod: app("shop", func(p *corev1.Pod) { p.Labels[injector.InjectKey] = "false" })},
		{name: "host network", pod: app("shop", func(p *corev1.Pod) { p.Spec.HostNetwork = true })},
		{name: "Istio's proxy", pod: app("shop", func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy", Image: "istio/proxyv2"})
		}), refused: injector.RefusedIstioProxy},
		{name: "exclusion beyond the mesh config", pod: app("shop", func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationExcludeOutboundPorts: "443"}
		}), refused: injector.RefusedExclusion},
		{name: "ambient namespace", pod: app("ambient-shop", nil)},
		{name: "ambient namespace, Workload API", pod: app("ambient-shop", socket), socket: true},
		{name: "trustmesh's ambient namespace, Workload API", pod: app("ambient-plain", socket), socket: true},
		{name: "out of ambient, in an injected namespace", pod: app("ambient-shop", label(injector.IstioLabelDataplaneMode, "none")), inject: true},
		{name: "out of ambient, in a namespace not injected", pod: app("ambient-plain", func(p *corev1.Pod) {
			socket(p)
			p.Labels[injector.IstioLabelDataplaneMode] = "none"
		})},
		{name: "ambient pod in an injected namespace", pod: app("shop", label(injector.LabelDataplaneMode, "ambient"))},
		{name: "ambient pod elsewhere, Workload API", pod: app("plain", func(p *corev1.Pod) {
			socket(p)
			p.Labels[injector.IstioLabelDataplaneMode] = "ambient"
		}), socket: true},
		{name: "trustmesh's ambient pod label elsewhere, Workload API", pod: app("plain", func(p *corev1.Pod) {
			socket(p)
			p.Labels[injector.LabelDataplaneMode] = "ambient"
		}), socket: true},
		{name: "Workload API without ambient", pod: app("shop", socket), refused: injector.RefusedWorkloadAPI},
	} {
		t.Run(tc.name, func(t *testing.T) {
			stored, err := cs.CoreV1().Pods(tc.pod.Namespace).Create(ctx, tc.pod, metav1.CreateOptions{})
			if tc.refused != "" {
				var status apierrors.APIStatus
				if !errors.As(err, &status) {
					t.Fatalf("error %v, want an admission denial", err)
				}
				st := status.Status()
				if st.Code != 403 || st.Details == nil || len(st.Details.Causes) != 1 ||
					st.Details.Causes[0].Type != webhook.CauseType(tc.refused) {
					t.Fatalf("denial %+v, want 403 with cause %s", st, webhook.CauseType(tc.refused))
				}
				t.Logf("refused: %s", st.Message)
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, c := range stored.Spec.InitContainers {
				names = append(names, c.Name)
			}
			if !tc.inject {
				if len(names) > 0 || stored.Annotations[injector.AnnotationStatus] != "" {
					t.Fatalf("pod was injected: %v", names)
				}
				var socketVolume bool
				for _, v := range stored.Spec.Volumes {
					socketVolume = socketVolume || v.Name == injector.VolumeNodeSocket && v.HostPath != nil && v.HostPath.Path == injector.NodeSocketDir
				}
				var env []string
				for _, e := range stored.Spec.Containers[0].Env {
					env = append(env, e.Name+"="+e.Value)
				}
				if tc.socket != socketVolume || tc.socket != slices.Equal(env, []string{"SPIFFE_ENDPOINT_SOCKET=unix:///run/trustmesh/node/socket"}) {
					t.Fatalf("node socket volume %v, env %v; want the socket: %v", socketVolume, env, tc.socket)
				}
				return
			}
			if !slices.Equal(names, []string{injector.ContainerInit, injector.ContainerAgent, injector.ContainerProxy}) {
				t.Fatalf("init containers %v", names)
			}
			// Stored as the injector would inject it (the API server adds
			// its defaults around it).
			local := tc.pod.DeepCopy()
			if _, err := inj.InjectPod(local.Namespace, &local.ObjectMeta, &local.Spec); err != nil {
				t.Fatal(err)
			}
			for i, c := range local.Spec.InitContainers {
				got := stored.Spec.InitContainers[i]
				if !slices.Equal(got.Args, c.Args) || !slices.Equal(got.Command, c.Command) || got.Image != c.Image ||
					got.RestartPolicy == nil != (c.RestartPolicy == nil) {
					t.Errorf("stored %s differs from the injector's", c.Name)
				}
			}
			if got := stored.Spec.Containers[0].ReadinessProbe.HTTPGet; got.Port.IntValue() != 15020 {
				t.Errorf("probe not rewritten: %+v", got)
			}
			if stored.Annotations[injector.AnnotationStatus] == "" || stored.Labels[injector.LabelProxy] != "sidecar" {
				t.Errorf("injection not recorded: %v %v", stored.Annotations, stored.Labels)
			}
		})
	}
}

// TestGoldenManifestsAreValid has the API server validate every golden
// injected manifest under a dry run: the injected pods are pods Kubernetes
// accepts, native sidecars included.
func TestGoldenManifestsAreValid(t *testing.T) {
	cfg := kube(t)
	cs := kubernetes.NewForConfigOrDie(cfg)
	ctx := context.Background()
	for _, ns := range []string{"shop", "bank", "trustmesh-gateways", "trustmesh-system"} {
		namespace(t, cs, ns, nil)
	}
	dc, err := discovery.NewDiscoveryClientForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	mapper := restmapper.NewDeferredDiscoveryRESTMapper(memory.NewMemCacheClient(dc))
	dyn := dynamic.NewForConfigOrDie(cfg)
	files, err := filepath.Glob("../testdata/inject/*.injected")
	if err != nil || len(files) == 0 {
		t.Fatalf("no golden files: %v", err)
	}
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := utilyaml.NewYAMLOrJSONDecoder(bytes.NewReader(data), 4096)
		for {
			var obj unstructured.Unstructured
			if err := dec.Decode(&obj.Object); errors.Is(err, io.EOF) {
				break
			} else if err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			gvk := obj.GroupVersionKind()
			m, err := mapper.RESTMapping(gvk.GroupKind(), gvk.Version)
			if err != nil {
				t.Fatal(err)
			}
			if gvk.Kind == "Namespace" {
				// Created for real: the objects after it go into it.
				if _, err := dyn.Resource(m.Resource).Create(ctx, &obj, metav1.CreateOptions{}); err != nil && !apierrors.IsAlreadyExists(err) {
					t.Errorf("%s: Namespace %s refused: %v", filepath.Base(f), obj.GetName(), err)
				}
				continue
			}
			_, err = dyn.Resource(m.Resource).Namespace(obj.GetNamespace()).Create(ctx, &obj, metav1.CreateOptions{DryRun: []string{metav1.DryRunAll}})
			if err != nil {
				t.Errorf("%s: %s %s/%s refused: %v", filepath.Base(f), gvk.Kind, obj.GetNamespace(), obj.GetName(), err)
			}
		}
	}
}
