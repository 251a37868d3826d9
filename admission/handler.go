package admission

import (
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"mime"
	"net/http"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
)

// maxBody bounds an AdmissionReview; the apiserver's own request limit is
// 3 MiB, and the review wraps the object (and, on UPDATE, the old one).
const maxBody = 8 << 20

// bodyReadTimeout bounds the read of a request's body, which is read
// before the request waits for a review slot: the apiserver sends a review
// of at most a few MiB at once, and a client that sends its body slowly
// is cut off here instead of holding a slot until the server's
// ReadTimeout, with every real review meanwhile refused as busy.
const bodyReadTimeout = 5 * time.Second

// HandlerConfig configures the webhook's HTTP handler.
type HandlerConfig struct {
	// Registerer, if set, receives trustmesh_admission_reviews_total.
	Registerer prometheus.Registerer
	Log        *slog.Logger
	// ProbeToken, if set, is a secret of this process: an object whose
	// ProbeAnnotation carries it is denied, whatever else it holds, with
	// "validation probe TOKEN answered by ProbeIdentity". That denial shows
	// the process's controller that its own webhook answers, and no other
	// webhook's, which cannot know the token. Any other value of the
	// annotation is nothing special, and is never quoted.
	ProbeToken    string
	ProbeIdentity string
	// Providers holds CUSTOM policies to the control plane's bundles; nil
	// means none are loaded (see Providers).
	Providers Providers
	// MaxConcurrentReviews bounds the reviews that run at once; others
	// wait for one to finish until their timeout, then are refused
	// (OutcomeBusy). Zero means DefaultMaxConcurrentReviews.
	MaxConcurrentReviews int
}

// ProbeAnnotation carries the token of a control plane's readiness probe.
const ProbeAnnotation = "trustmesh.io/validation-probe"

type handler struct {
	log                 *slog.Logger
	reviews             *prometheus.CounterVec
	probeToken, probeID string
	providers           Providers
	limit               *limiter
}

// NewHandler returns the webhook's handler, serving POST Path.
func NewHandler(cfg HandlerConfig) (http.Handler, error) {
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	h := &handler{log: cfg.Log, probeToken: cfg.ProbeToken, probeID: cfg.ProbeIdentity, providers: cfg.Providers, reviews: prometheus.NewCounterVec(prometheus.CounterOpts{
		Name: "trustmesh_admission_reviews_total",
		Help: "Objects reviewed by the validating webhook, by kind (other: a kind trustmesh does not read) and outcome " +
			"(allowed, warned: allowed with a warning, denied: refused by trustmesh's checks, error: did not decode, or a malformed review, " +
			"busy: refused with HTTP 429, as too many reviews were running until its timeout; " +
			"unavailable: refused with HTTP 503, as the webhook could not check it then).",
	}, []string{"kind", "outcome"})}
	for _, k := range kinds {
		for _, o := range []string{OutcomeAllowed, OutcomeDenied, OutcomeWarned, OutcomeError, OutcomeUnavailable} {
			h.reviews.WithLabelValues(k.Kind, o)
		}
	}
	if cfg.Registerer != nil {
		if err := cfg.Registerer.Register(h.reviews); err != nil {
			return nil, fmt.Errorf("admission: register metrics: %w", err)
		}
	}
	h.limit = newLimiter(cfg.MaxConcurrentReviews, h.reviews)
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
	// The body is read, under its own deadline, before the request takes
	// a review slot: a slow sender must not hold one. ErrNotSupported (a
	// writer without deadlines, as in tests) leaves the server's own.
	rc := http.NewResponseController(w)
	_ = rc.SetReadDeadline(time.Now().Add(bodyReadTimeout))
	body, err := io.ReadAll(http.MaxBytesReader(w, r.Body, maxBody))
	if err != nil {
		h.reviews.WithLabelValues("other", OutcomeError).Inc()
		code := http.StatusBadRequest
		if _, tooBig := errors.AsType[*http.MaxBytesError](err); tooBig {
			code = http.StatusRequestEntityTooLarge
		}
		http.Error(w, "admission: read body: "+err.Error(), code)
		return
	}
	// The body is read: no deadline while the review waits and runs, so
	// that the server does not take a passed one for a broken connection.
	_ = rc.SetReadDeadline(time.Time{})
	release, ok := h.limit.acquire(w, r)
	if !ok {
		return
	}
	defer release()
	var review admissionv1.AdmissionReview
	if err := json.Unmarshal(body, &review); err != nil || review.Request == nil {
		h.reviews.WithLabelValues("other", OutcomeError).Inc()
		http.Error(w, "admission: body is not an AdmissionReview with a request", http.StatusBadRequest)
		return
	}
	req := review.Request
	if h.isProbe(req) {
		h.answerProbe(w, review)
		return
	}
	resp, outcome := Review(req, h.providers)
	resp.UID = req.UID
	kind := kindOf(req.Resource)
	h.reviews.WithLabelValues(kind, outcome).Inc()
	if outcome == OutcomeUnavailable {
		// A call failure, not a denial, so that the failurePolicy decides.
		// No Retry-After: the apiserver's client would retry until the
		// webhook's timeout, and only then apply the failurePolicy.
		h.log.Info("admission cannot check now", "kind", kind, "namespace", req.Namespace, "name", req.Name,
			"operation", req.Operation, "reason", resp.Result.Message)
		h.fail(w, resp.Result)
		return
	}
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

// isProbe reports whether req's object carries this process's probe token.
func (h *handler) isProbe(req *admissionv1.AdmissionRequest) bool {
	if h.probeToken == "" {
		return false
	}
	var obj struct {
		Metadata struct {
			Annotations map[string]string `json:"annotations"`
		} `json:"metadata"`
	}
	return json.Unmarshal(req.Object.Raw, &obj) == nil &&
		subtle.ConstantTimeCompare([]byte(obj.Metadata.Annotations[ProbeAnnotation]), []byte(h.probeToken)) == 1
}

// answerProbe denies this process's probe, quoting its token.
func (h *handler) answerProbe(w http.ResponseWriter, review admissionv1.AdmissionReview) {
	h.reviews.WithLabelValues(kindOf(review.Request.Resource), OutcomeDenied).Inc()
	out, err := json.Marshal(admissionv1.AdmissionReview{TypeMeta: review.TypeMeta, Response: &admissionv1.AdmissionResponse{
		UID: review.Request.UID, Allowed: false, Result: &metav1.Status{
			Status: metav1.StatusFailure, Code: http.StatusForbidden, Reason: metav1.StatusReasonForbidden,
			Message: fmt.Sprintf("validation probe %s answered by %s", h.probeToken, h.probeID),
		}}})
	if err != nil {
		http.Error(w, "admission: encode response", http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_, _ = w.Write(out)
}

// fail answers a review with st's code and st as the body: the apiserver's
// client takes a Status body's message for the error it reports, where a
// plain text body would give only the code's generic text.
func (h *handler) fail(w http.ResponseWriter, st *metav1.Status) {
	out, err := json.Marshal(&metav1.Status{TypeMeta: metav1.TypeMeta{APIVersion: "v1", Kind: "Status"},
		Status: metav1.StatusFailure, Code: st.Code, Reason: st.Reason, Message: st.Message})
	if err != nil {
		http.Error(w, st.Message, int(st.Code))
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(int(st.Code))
	_, _ = w.Write(out)
}
