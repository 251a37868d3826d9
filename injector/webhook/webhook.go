// Package webhook serves the injector as a Kubernetes mutating admission
// webhook, over TLS on :15017.
//
// Each AdmissionReview for a Pod CREATE is answered with a JSON patch that
// injects the pod, with no patch for a pod left alone, or with a denial for
// a pod the injector refuses: the denial's Status carries the refusal code
// as a cause of type CauseType(code), so that callers can branch on it. Any
// other failure denies too: the webhook configuration's failurePolicy is
// Fail for opted-in namespaces, and an opted-in pod must never start
// without its sidecar.
package webhook

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	"gomodules.xyz/jsonpatch/v2"
	admissionv1 "k8s.io/api/admission/v1"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trustmesh/trustmesh/injector"
)

// Path is where the webhook is served.
const Path = "/inject"

// maxBody bounds an AdmissionReview; the apiserver's own request limit is
// 3 MiB, and the review wraps the object.
const maxBody = 8 << 20

// Injector injects one pod.
type Injector interface {
	InjectPod(namespace string, meta *metav1.ObjectMeta, spec *corev1.PodSpec) (injector.Result, error)
}

var _ Injector = (*injector.Injector)(nil)

// CauseType is the type of the StatusCause that carries a refusal code in
// a denial.
func CauseType(code injector.Code) metav1.CauseType {
	return metav1.CauseType("trustmesh.io/" + string(code))
}

// HandlerConfig configures the admission handler.
type HandlerConfig struct {
	Injector Injector
	// Registerer, if set, receives trustmesh_injector_admissions_total.
	Registerer prometheus.Registerer
	Log        *slog.Logger
}

type handler struct {
	inj        Injector
	log        *slog.Logger
	admissions *prometheus.CounterVec
}

// NewHandler returns the admission handler, serving Path.
func NewHandler(cfg HandlerConfig) (http.Handler, error) {
	if cfg.Injector == nil {
		return nil, errors.New("webhook: an Injector is required")
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	h := &handler{inj: cfg.Injector, log: cfg.Log, admissions: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "trustmesh_injector_admissions_total",
		Help: "Pods reviewed by the injection webhook, by outcome (injected, skipped, refused, error) and reason.",
	}, []string{"outcome", "reason"})}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(h.admissions); err != nil {
			return nil, fmt.Errorf("webhook: register metrics: %w", err)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("POST "+Path, h)
	return mux, nil
}

var podResource = metav1.GroupVersionResource{Version: "v1", Resource: "pods"}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		http.Error(w, "webhook: want Content-Type application/json", http.StatusUnsupportedMediaType)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		http.Error(w, "webhook: read body: "+err.Error(), http.StatusRequestEntityTooLarge)
		return
	}
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
		http.Error(w, "webhook: body is not an AdmissionReview with a request", http.StatusBadRequest)
		return
	}
	resp := h.review(review.Request)
	resp.UID = review.Request.UID
	out, err := json.Marshal(admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: resp})
	if err != nil {
		http.Error(w, "webhook: encode response", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(out)
}

func (h *handler) review(req *admissionv1.AdmissionRequest) *admissionv1.AdmissionResponse {
	if req.Resource != podResource || req.SubResource != "" || req.Operation != admissionv1.Create {
		// Not asked for by the webhook configuration; nothing to do.
		return &admissionv1.AdmissionResponse{Allowed: true}
	}
	var pod corev1.Pod
	if err := json.Unmarshal(req.Object.Raw, &pod); err != nil {
		return h.deny(req, "error", fmt.Errorf("webhook: decode pod: %w", err))
	}
	orig, err := json.Marshal(&pod)
	if err != nil {
		return h.deny(req, "error", fmt.Errorf("webhook: encode pod: %w", err))
	}
	res, err := h.inj.InjectPod(req.Namespace, &pod.ObjectMeta, &pod.Spec)
	if err != nil {
		return h.deny(req, "refused", err)
	}
	if !res.Injected {
		h.admissions.WithLabelValues("skipped", string(res.Skipped)).Inc()
		resp := &admissionv1.AdmissionResponse{Allowed: true}
		if res.Skipped == injector.SkipHostNetwork {
			resp.Warnings = []string{"trustmesh: host-network pods are not injected; this pod runs outside the mesh"}
		}
		return resp
	}
	mutated, err := json.Marshal(&pod)
	if err != nil {
		return h.deny(req, "error", fmt.Errorf("webhook: encode injected pod: %w", err))
	}
	ops, err := jsonpatch.CreatePatch(orig, mutated)
	if err != nil {
		return h.deny(req, "error", fmt.Errorf("webhook: patch: %w", err))
	}
	patch, err := json.Marshal(ops)
	if err != nil {
		return h.deny(req, "error", fmt.Errorf("webhook: encode patch: %w", err))
	}
	h.admissions.WithLabelValues("injected", string(res.Template)).Inc()
	h.log.Debug("injected pod", "namespace", req.Namespace, "name", podName(req, &pod), "template", res.Template)
	pt := admissionv1.PatchTypeJSONPatch
	return &admissionv1.AdmissionResponse{Allowed: true, Patch: patch, PatchType: &pt}
}

// deny refuses the pod. A refusal is the pod's fault (403, with its code as
// a cause); anything else is the webhook's (500). Either way the pod does
// not start uninjected.
func (h *handler) deny(req *admissionv1.AdmissionRequest, outcome string, err error) *admissionv1.AdmissionResponse {
	status := &metav1.Status{Status: metav1.StatusFailure, Message: err.Error()}
	var refusal *injector.Refusal
	if errors.As(err, &refusal) {
		status.Code, status.Reason = http.StatusForbidden, metav1.StatusReasonForbidden
		status.Details = &metav1.StatusDetails{Causes: []metav1.StatusCause{{
			Type: CauseType(refusal.Code), Message: refusal.Err.Error(),
		}}}
		h.admissions.WithLabelValues(outcome, string(refusal.Code)).Inc()
	} else {
		outcome = "error"
		status.Code, status.Reason = http.StatusInternalServerError, metav1.StatusReasonInternalError
		h.admissions.WithLabelValues(outcome, "").Inc()
	}
	h.log.Warn("refused pod", "namespace", req.Namespace, "name", req.Name, "outcome", outcome, "error", err)
	return &admissionv1.AdmissionResponse{Allowed: false, Result: status}
}

func podName(req *admissionv1.AdmissionRequest, pod *corev1.Pod) string {
	switch {
	case req.Name != "":
		return req.Name
	case pod.Name != "":
		return pod.Name
	}
	return pod.GenerateName + "*"
}
