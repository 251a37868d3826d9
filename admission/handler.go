package admission

import (
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"

	"github.com/prometheus/client_golang/prometheus"
	admissionv1 "k8s.io/api/admission/v1"
)

// maxBody bounds an AdmissionReview; the apiserver's own request limit is
// 3 MiB, and the review wraps the object (and, on UPDATE, the old one).
const maxBody = 8 << 20

// HandlerConfig configures the webhook's HTTP handler.
type HandlerConfig struct {
	// Registerer, if set, receives trustmesh_admission_reviews_total.
	Registerer prometheus.Registerer
	Log        *slog.Logger
}

type handler struct {
	log     *slog.Logger
	reviews *prometheus.CounterVec
}

// NewHandler returns the webhook's handler, serving POST Path.
func NewHandler(cfg HandlerConfig) (http.Handler, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	h := &handler{log: cfg.Log, reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "trustmesh_admission_reviews_total",
		Help: "Objects reviewed by the validating webhook, by kind (other: a kind trustmesh does not read) and outcome " +
			"(allowed, warned: allowed with a warning, denied: refused by trustmesh's checks, error: did not decode, or a malformed review).",
	}, []string{"kind", "outcome"})}
	for _, k := range kinds {
		for _, o := range []string{OutcomeAllowed, OutcomeDenied, OutcomeWarned, OutcomeError} {
			h.reviews.WithLabelValues(k.Kind, o)
		}
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(h.reviews); err != nil {
			return nil, fmt.Errorf("admission: register metrics: %w", err)
		}
	}
	mux := http.NewServeMux()
	mux.Handle("POST "+Path, h)
	return mux, nil
}

func (h *handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil || mt != "application/json" {
		h.reviews.WithLabelValues("other", OutcomeError).Inc()
		http.Error(w, "admission: want Content-Type application/json", http.StatusUnsupportedMediaType)
		return
	}
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		h.reviews.WithLabelValues("other", OutcomeError).Inc()
		http.Error(w, "admission: read body: "+err.Error(), http.StatusRequestEntityTooLarge)
		return
	}
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
		h.reviews.WithLabelValues("other", OutcomeError).Inc()
		http.Error(w, "admission: body is not an AdmissionReview with a request", http.StatusBadRequest)
		return
	}
	req := review.Request
	resp, outcome := Review(req)
	resp.UID = req.UID
	kind := kindOf(req.Resource)
	h.reviews.WithLabelValues(kind, outcome).Inc()
	switch outcome {
	case OutcomeDenied, OutcomeError:
		h.log.Info("admission denied", "kind", kind, "namespace", req.Namespace, "name", req.Name,
			"operation", req.Operation, "user", req.UserInfo.Username, "reason", resp.Result.Message)
	case OutcomeWarned:
		h.log.Info("admission warned", "kind", kind, "namespace", req.Namespace, "name", req.Name,
			"operation", req.Operation, "warnings", resp.Warnings)
	}
	out, err := json.Marshal(admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: resp})
	if err != nil {
		http.Error(w, "admission: encode response", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(out)
}
