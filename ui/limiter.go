package ui

import (
	"log/slog"
	"net"
	"net/http"
	"strconv"
	"sync"
	"time"
)

// Token guessing is throttled per client IP, for the login form and for
// "Authorization: Bearer" alike: each IP has a bucket of failBurst
// attempts that refills at one per failRefill. An attempt takes one before
// the token is compared (under one lock, so parallel guesses cannot all
// pass the check), and a right token gives it back: only failures count.
// One IP's failures never lock another IP out.
const (
	failBurst  = 5
	failRefill = time.Second
	// maxFailIPs bounds the IPs remembered; full buckets are forgotten
	// first, then the longest idle.
	maxFailIPs = 4096
	// failLogEvery bounds the refused-attempt log lines to one per period.
	failLogEvery = 10 * time.Second
)

type bucket struct {
	tokens float64
	at     time.Time // when tokens was last brought up to date
}

type failLimiter struct {
	mu  sync.Mutex
	by  map[string]*bucket
	log *slog.Logger

	loggedAt   time.Time
	suppressed int
}

func newFailLimiter(log *slog.Logger) *failLimiter {
	return &failLimiter{by: map[string]*bucket{}, log: log}
}

// clientIP is the request's peer address: headers such as
// X-Forwarded-For are the client's to write, so they are not trusted.
func clientIP(r *http.Request) string {
	if h, _, err := net.SplitHostPort(r.RemoteAddr); err == nil {
		return h
	}
	return r.RemoteAddr
}

func (b *bucket) refill(now time.Time) {
	if el := now.Sub(b.at); el > 0 {
		b.tokens = min(failBurst, b.tokens+float64(el)/float64(failRefill))
	}
	b.at = now
}

// take takes one attempt from ip's bucket. When it is empty it answers
// false and how long until the next attempt, and logs the refusal (at
// most once per failLogEvery, with the count of those not logged).
func (l *failLimiter) take(ip string, now time.Time, what string) (bool, time.Duration) {
	l.mu.Lock()
	defer l.mu.Unlock()
	b := l.by[ip]
	if b == nil {
		l.evict(now)
		b = &bucket{tokens: failBurst, at: now}
		l.by[ip] = b
	}
	b.refill(now)
	if b.tokens >= 1 {
		b.tokens--
		return true, 0
	}
	wait := time.Duration((1 - b.tokens) * float64(failRefill))
	if now.Sub(l.loggedAt) >= failLogEvery || l.loggedAt.IsZero() {
		l.log.Warn("web UI: refused a token attempt: too many wrong tokens from this address",
			"client", ip, "via", what, "retry_after", wait.Round(time.Millisecond), "refused_not_logged", l.suppressed)
		l.loggedAt, l.suppressed = now, 0
	} else {
		l.suppressed++
	}
	return false, wait
}

// giveBack returns the attempt of a right token.
func (l *failLimiter) giveBack(ip string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if b := l.by[ip]; b != nil {
		b.tokens = min(failBurst, b.tokens+1)
	}
}

// evict makes room for one more IP.
func (l *failLimiter) evict(now time.Time) {
	if len(l.by) < maxFailIPs {
		return
	}
	for ip, b := range l.by {
		if b.tokens+float64(now.Sub(b.at))/float64(failRefill) >= failBurst {
			delete(l.by, ip)
		}
	}
	for len(l.by) >= maxFailIPs {
		var oldest string
		for ip, b := range l.by {
			if oldest == "" || b.at.Before(l.by[oldest].at) {
				oldest = ip
			}
		}
		delete(l.by, oldest)
	}
}

// retryAfter is a Retry-After value in whole seconds, at least 1.
func retryAfter(d time.Duration) string {
	s := int((d + time.Second - 1) / time.Second)
	return strconv.Itoa(max(s, 1))
}
