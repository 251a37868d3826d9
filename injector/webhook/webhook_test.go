package webhook_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"testing"

	jsonpatch "github.com/evanphx/json-patch/v5"
	"github.com/prometheus/client_golang/prometheus"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/types"

	"github.com/trustmesh/trustmesh/injector"
	"github.com/trustmesh/trustmesh/injector/webhook"
)

func newInjector(t *testing.T) *injector.Injector {
	t.Helper()
	inj, err := injector.New(injector.Config{})
	if err != nil {
		t.Fatal(err)
	}
	return inj
}

func pod(mutate func(*corev1.Pod)) *corev1.Pod {
	p := &corev1.Pod{
		TypeMeta:   metav1.TypeMeta{APIVersion: "v1", Kind: "Pod"},
		ObjectMeta: metav1.ObjectMeta{GenerateName: "web-", Labels: map[string]string{"app": "web"}},
		Spec:       corev1.PodSpec{Containers: []corev1.Container{{Name: "web", Image: "registry.example/web:1"}}},
	}
	if mutate != nil {
		mutate(p)
	}
	return p
}

func review(t *testing.T, p *corev1.Pod, mutate func(*admissionv1.AdmissionRequest)) []byte {
	t.Helper()
	raw, err := json.Marshal(p)
	if err != nil {
		t.Fatal(err)
	}
	req := &admissionv1.AdmissionRequest{
		UID:       types.UID("uid-1"),
		Kind:      metav1.GroupVersionKind{Version: "v1", Kind: "Pod"},
		Resource:  metav1.GroupVersionResource{Version: "v1", Resource: "pods"},
		Namespace: "shop",
		Operation: admissionv1.Create,
		Object:    runtime.RawExtension{Raw: raw},
	}
	if mutate != nil {
		mutate(req)
	}
	body, err := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request:  req,
	})
	if err != nil {
		t.Fatal(err)
	}
	return body
}

func post(t *testing.T, h http.Handler, body []byte, contentType string) (*http.Response, *admissionv1.AdmissionResponse) {
	t.Helper()
	r := httptest.NewRequest(http.MethodPost, webhook.Path, bytes.NewReader(body))
	r.Header.Set("Content-Type", contentType)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, r)
	resp := w.Result()
	if resp.StatusCode != http.StatusOK {
		return resp, nil
	}
	var out admissionv1.AdmissionReview
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	if out.Response == nil || out.Response.UID != "uid-1" || out.Kind != "AdmissionReview" {
		t.Fatalf("response does not answer the review: %+v", out)
	}
	return resp, out.Response
}

// TestHandler checks each outcome; an injected pod's patch, applied to the
// original, must give exactly what the injector gives.
func TestHandler(t *testing.T) {
	inj := newInjector(t)
	injected := pod(nil)
	if _, err := inj.InjectPod("shop", &injected.ObjectMeta, &injected.Spec); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name    string
		pod     *corev1.Pod
		request func(*admissionv1.AdmissionRequest)
		patched bool
		denied  injector.Code
		warns   bool
	}{
		{name: "injected", pod: pod(nil), patched: true},
		{name: "already injected", pod: injected},
		{name: "opted out", pod: pod(func(p *corev1.Pod) { p.Annotations = map[string]string{injector.InjectKey: "false"} })},
		{name: "own namespace", pod: pod(nil), request: func(r *admissionv1.AdmissionRequest) { r.Namespace = "trustmesh-system" }},
		{name: "host network", pod: pod(func(p *corev1.Pod) { p.Spec.HostNetwork = true }), warns: true},
		{name: "not a create", pod: pod(nil), request: func(r *admissionv1.AdmissionRequest) { r.Operation = admissionv1.Update }},
		{name: "a subresource", pod: pod(nil), request: func(r *admissionv1.AdmissionRequest) { r.SubResource = "ephemeralcontainers" }},
		{name: "istio's proxy", pod: pod(func(p *corev1.Pod) {
			p.Spec.Containers = append(p.Spec.Containers, corev1.Container{Name: "istio-proxy", Image: "istio/proxyv2"})
		}), denied: injector.RefusedIstioProxy},
		{name: "exclusion not allowed", pod: pod(func(p *corev1.Pod) {
			p.Annotations = map[string]string{injector.AnnotationExcludeOutboundCIDRs: "0.0.0.0/0"}
		}), denied: injector.RefusedExclusion},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := prometheus.NewRegistry()
			h, err := webhook.NewHandler(webhook.HandlerConfig{Injector: inj, Registerer: reg})
			if err != nil {
				t.Fatal(err)
			}
			_, resp := post(t, h, review(t, tc.pod, tc.request), "application/json")
			if resp == nil {
				t.Fatal("no admission response")
			}
			if tc.denied != "" {
				if resp.Allowed || resp.Result == nil || resp.Result.Code != http.StatusForbidden {
					t.Fatalf("not denied with 403: %+v", resp)
				}
				causes := resp.Result.Details.Causes
				if len(causes) != 1 || causes[0].Type != webhook.CauseType(tc.denied) {
					t.Fatalf("causes %+v, want %s", causes, webhook.CauseType(tc.denied))
				}
				if n := count(t, reg, "refused", string(tc.denied)); n != 1 {
					t.Errorf("refusal counted %v times", n)
				}
				return
			}
			if !resp.Allowed {
				t.Fatalf("denied: %+v", resp.Result)
			}
			if (len(resp.Warnings) > 0) != tc.warns {
				t.Errorf("warnings %v", resp.Warnings)
			}
			if !tc.patched {
				if resp.Patch != nil {
					t.Fatalf("unexpected patch %s", resp.Patch)
				}
				return
			}
			if resp.PatchType == nil || *resp.PatchType != admissionv1.PatchTypeJSONPatch {
				t.Fatal("no JSON patch type")
			}
			patch, err := jsonpatch.DecodePatch(resp.Patch)
			if err != nil {
				t.Fatal(err)
			}
			orig, _ := json.Marshal(tc.pod)
			got, err := patch.Apply(orig)
			if err != nil {
				t.Fatal(err)
			}
			want, _ := json.Marshal(injected)
			if !jsonpatch.Equal(got, want) {
				t.Fatalf("patched pod differs from the injector's:\n%s\nwant\n%s", got, want)
			}
		})
	}
}

// count returns trustmesh_injector_admissions_total for outcome and reason.
func count(t *testing.T, reg *prometheus.Registry, outcome, reason string) float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "trustmesh_injector_admissions_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["outcome"] == outcome && labels["reason"] == reason {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func TestHandlerRejectsBadRequests(t *testing.T) {
	h, err := webhook.NewHandler(webhook.HandlerConfig{Injector: newInjector(t)})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, method, contentType string
		body                      []byte
		want                      int
	}{
		{"not JSON", http.MethodPost, "application/json", []byte("{"), http.StatusBadRequest},
		{"no request", http.MethodPost, "application/json", []byte(`{"kind":"AdmissionReview"}`), http.StatusBadRequest},
		{"wrong content type", http.MethodPost, "text/plain", review(t, pod(nil), nil), http.StatusUnsupportedMediaType},
		{"GET", http.MethodGet, "application/json", nil, http.StatusMethodNotAllowed},
		{"too large", http.MethodPost, "application/json", bytes.Repeat([]byte(" "), 9<<20), http.StatusRequestEntityTooLarge},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(tc.method, webhook.Path, bytes.NewReader(tc.body))
			r.Header.Set("Content-Type", tc.contentType)
			w := httptest.NewRecorder()
			h.ServeHTTP(w, r)
			if w.Code != tc.want {
				body, _ := io.ReadAll(w.Body)
				t.Fatalf("status %d, want %d: %s", w.Code, tc.want, body)
			}
		})
	}
}

func TestUndecodablePodIsDenied(t *testing.T) {
	h, err := webhook.NewHandler(webhook.HandlerConfig{Injector: newInjector(t)})
	if err != nil {
		t.Fatal(err)
	}
	body := review(t, pod(nil), func(r *admissionv1.AdmissionRequest) { r.Object.Raw = []byte(`{"spec":{"containers":"web"}}`) })
	_, resp := post(t, h, body, "application/json")
	if resp.Allowed || resp.Result.Code != http.StatusInternalServerError {
		t.Fatalf("a pod the webhook cannot read was not denied: %+v", resp)
	}
}
