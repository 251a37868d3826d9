package admission

import (
	"net/http"
	"runtime"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// OutcomeBusy is a review refused because as many reviews as
// HandlerConfig.MaxConcurrentReviews allows were running until its
// timeout. The webhook answers it with HTTP 429 and no AdmissionReview: a
// call failure, which the apiserver resolves by the configuration's
// failurePolicy. Under Fail the write is refused; under Ignore the object
// is admitted unchecked (the control plane's load still refuses it, and
// with it the whole policy set). It is counted with kind "other".
const OutcomeBusy = "busy"

// DefaultMaxConcurrentReviews is how many reviews run at once by default:
// half the CPUs the process may use, at least one. A review compiles the
// policy's Rego, in the process that is also the CA, xDS and ext_authz.
func DefaultMaxConcurrentReviews() int { return max(1, runtime.GOMAXPROCS(0)/2) }

// maxWait bounds the wait for a review slot of a request that names no
// timeout: the longest timeoutSeconds a webhook configuration may have.
const maxWait = 30 * time.Second

// limiter runs at most cap(slots) reviews at once; a request waits for a
// slot until its context ends or the timeout the apiserver gives the call
// (its timeout query parameter) passes, and is then refused. Only a
// request whose body is read takes a slot, so a client that sends its
// body slowly holds no slot (see bodyReadTimeout).
type limiter struct {
	slots chan struct{}
	busy  prometheus.Counter
}

func newLimiter(n int, reviews *prometheus.CounterVec) *limiter {
	if n <= 0 {
		n = DefaultMaxConcurrentReviews()
	}
	return &limiter{slots: make(chan struct{}, n), busy: reviews.WithLabelValues("other", OutcomeBusy)}
}

// acquire waits for a slot and returns its release, or answers 429 and
// returns false.
func (l *limiter) acquire(w http.ResponseWriter, r *http.Request) (release func(), ok bool) {
	wait := maxWait
	// The apiserver calls webhooks with ?timeout=<timeoutSeconds>s.
	if d, err := time.ParseDuration(r.URL.Query().Get("timeout")); err == nil && d > 0 && d < wait {
		wait = d
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case l.slots <- struct{}{}:
		return func() { <-l.slots }, true
	case <-r.Context().Done():
	case <-t.C:
	}
	l.busy.Inc()
	w.Header().Set("Retry-After", strconv.Itoa(1))
	http.Error(w, "admission: too many reviews running; none finished within "+wait.String(), http.StatusTooManyRequests)
	return nil, false
}
