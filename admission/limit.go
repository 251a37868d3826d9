package admission

import (
	"net/http"
	"runtime"
	"strconv"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// OutcomeBusy is a review refused unread because as many reviews as
// HandlerConfig.MaxConcurrentReviews allows were running until its timeout:
// the webhook answers 429, a call failure the apiserver resolves by the
// configuration's failurePolicy. It is counted with kind "other".
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
// (its timeout query parameter) passes, and is then refused.
type limiter struct {
	slots chan struct{}
	next  http.Handler
	busy  prometheus.Counter
}

func newLimiter(n int, next http.Handler, reviews *prometheus.CounterVec) *limiter {
	if n <= 0 {
		n = DefaultMaxConcurrentReviews()
	}
	return &limiter{slots: make(chan struct{}, n), next: next, busy: reviews.WithLabelValues("other", OutcomeBusy)}
}

func (l *limiter) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	wait := maxWait
	// The apiserver calls webhooks with ?timeout=<timeoutSeconds>s.
	if d, err := time.ParseDuration(r.URL.Query().Get("timeout")); err == nil && d > 0 && d < wait {
		wait = d
	}
	t := time.NewTimer(wait)
	defer t.Stop()
	select {
	case l.slots <- struct{}{}:
	case <-r.Context().Done():
		l.refuse(w, wait)
		return
	case <-t.C:
		l.refuse(w, wait)
		return
	}
	defer func() { <-l.slots }()
	l.next.ServeHTTP(w, r)
}

func (l *limiter) refuse(w http.ResponseWriter, waited time.Duration) {
	l.busy.Inc()
	w.Header().Set("Retry-After", strconv.Itoa(1))
	http.Error(w, "admission: too many reviews running; none finished within "+waited.String(), http.StatusTooManyRequests)
}
