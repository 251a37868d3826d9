// Package decisionlog writes one JSON line per authorization decision.
//
// Log never blocks the Check path: it stamps the time and hands the request
// and decision to a bounded queue; Run formats and writes them. When the
// queue is full the entry is dropped and counted (Dropped), because a slow
// disk must not slow or stop authorization. Query-string values and header
// values are redacted unless their names are allowlisted; paths are kept,
// except what the operator's path patterns match.
package decisionlog

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/google/uuid"
	"k8s.io/utils/clock"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// Redacted replaces values that are not allowlisted.
const Redacted = "REDACTED"

// DefaultHeaderAllowlist lists the headers whose values are logged by
// default.
var DefaultHeaderAllowlist = []string{"x-request-id", "user-agent", "content-type"}

// Config configures a Logger.
type Config struct {
	// Writer receives the JSON lines (stdout or a file).
	Writer io.Writer
	// Clock stamps decisions; nil means the real clock.
	Clock clock.PassiveClock
	// QueueSize bounds the entries waiting to be written; zero means 8192.
	QueueSize int
	// HeaderAllowlist names headers whose values are logged; nil means
	// DefaultHeaderAllowlist. Other headers are logged with Redacted.
	HeaderAllowlist []string
	// QueryAllowlist names query parameters whose values are logged.
	QueryAllowlist []string
	// NewID returns decision ids; nil means random (version 4) UUIDs.
	NewID func() string
	// RedactPaths are regular expressions whose matches in request paths
	// (and in the decision's error, which may quote a path) are replaced
	// by Redacted; see PathRedactor.
	RedactPaths []string
	// FlushInterval is the least time between two writes, unless a batch
	// fills (batchBytes): lines wait at most about this long in memory,
	// and a busy log makes one write per interval rather than one per
	// line or few. Zero means DefaultFlushInterval; negative writes as
	// soon as a line is queued.
	FlushInterval time.Duration
	// RecentDenials bounds the ring of the last denials Recent returns,
	// already redacted; zero means DefaultRecentDenials.
	RecentDenials int
}

// DefaultFlushInterval is Config.FlushInterval's default.
const DefaultFlushInterval = 5 * time.Millisecond

// DefaultRecentDenials is how many recent denials a Logger keeps for Recent.
const DefaultRecentDenials = 200

// Logger is a non-blocking decision log.
type Logger struct {
	w       io.Writer
	clock   clock.PassiveClock
	queue   chan item
	red     *Redactor
	newID   func() string
	dropped atomic.Uint64
	linger  time.Duration

	written atomic.Uint64

	// denials is a ring of the last denials' lines as written, newest
	// at denials[(next-1) % len]; filled by Run, never by Log.
	dmu     sync.Mutex
	denials [][]byte
	next    uint64
}

// item is a queued decision. The Decision is a copy: the caller may reuse
// its own once Log returns (extauthz pools them). A Decision's slices and
// pointers are never written after the engine returns it, so a shallow
// copy is enough.
type item struct {
	at  time.Time
	req *authv3.CheckRequest
	d   engine.Decision
}

// New validates cfg and returns a Logger; call Run to write.
func New(cfg Config) (*Logger, error) {
	if cfg.Writer == nil {
		return nil, errors.New("decisionlog: a writer is required")
	}
	if cfg.QueueSize < 0 {
		return nil, errors.New("decisionlog: queue size must not be negative")
	}
	if cfg.RecentDenials < 0 {
		return nil, errors.New("decisionlog: the number of recent denials kept must not be negative")
	}
	red, err := NewRedactor(cfg.HeaderAllowlist, cfg.QueryAllowlist, cfg.RedactPaths)
	if err != nil {
		return nil, err
	}
	l := &Logger{w: cfg.Writer, clock: cfg.Clock, newID: cfg.NewID, red: red}
	if l.clock == nil {
		l.clock = clock.RealClock{}
	}
	n := cfg.QueueSize
	if n == 0 {
		n = 8192
	}
	l.queue = make(chan item, n)
	switch {
	case cfg.FlushInterval == 0:
		l.linger = DefaultFlushInterval
	case cfg.FlushInterval > 0:
		l.linger = cfg.FlushInterval
	}
	d := cfg.RecentDenials
	if d == 0 {
		d = DefaultRecentDenials
	}
	l.denials = make([][]byte, d)
	return l, nil
}

// Redactor redacts request values as the decision log does: header values
// unless their names are allowlisted, query parameter values unless
// allowlisted, and what the path patterns match. Others that show request
// values (the UI's access view, who-can) use it so that they show no more
// than the log would.
type Redactor struct {
	headers map[string]bool
	query   map[string]bool
	paths   *PathRedactor
}

// NewRedactor returns the Redactor of a decision log with these settings
// (Config's HeaderAllowlist, QueryAllowlist and RedactPaths): a nil header
// allowlist means DefaultHeaderAllowlist.
func NewRedactor(headerAllowlist, queryAllowlist, redactPaths []string) (*Redactor, error) {
	paths, err := NewPathRedactor(redactPaths)
	if err != nil {
		return nil, err
	}
	r := &Redactor{headers: set(headerAllowlist), query: set(queryAllowlist), paths: paths}
	if headerAllowlist == nil {
		r.headers = set(DefaultHeaderAllowlist)
	}
	return r, nil
}

// Header returns the value of header name as the log shows it: the value
// when name is allowlisted (in any case), else Redacted.
func (r *Redactor) Header(name, value string) string {
	if !r.headers[strings.ToLower(name)] {
		return Redacted
	}
	return value
}

// Path returns a request path (with its query, if any) as the log shows it.
func (r *Redactor) Path(p string) string { return r.redactPath(p) }

// Text returns free text that may quote a path (an evaluation error) with
// what the path patterns match replaced.
func (r *Redactor) Text(s string) string { return r.paths.Redact(s) }

func set(names []string) map[string]bool {
	m := make(map[string]bool, len(names))
	for _, n := range names {
		m[strings.ToLower(n)] = true
	}
	return m
}

// Log queues a decision. It never blocks; a full queue drops the entry.
// It copies *d, so the caller may reuse d once Log returns; req must not
// change after.
func (l *Logger) Log(req *authv3.CheckRequest, d *engine.Decision) {
	select {
	case l.queue <- item{at: l.clock.Now(), req: req, d: *d}:
	default:
		l.dropped.Add(1)
	}
}

// Dropped returns how many entries were dropped because the queue was full.
func (l *Logger) Dropped() uint64 { return l.dropped.Load() }

// Written returns how many lines Run has written.
func (l *Logger) Written() uint64 { return l.written.Load() }

// Run writes queued entries until ctx ends, then writes what is still
// queued and returns nil. A write error is returned.
//
// Lines are encoded into one buffer and written in batches: whatever is
// queued when a write ends goes out in the next write, up to
// batchBytes, so a slower writer makes bigger, fewer writes rather than
// a longer queue. After a batch that did not fill, Run waits
// FlushInterval before the next, so that a steady stream of decisions
// costs one write per interval, not one per decision.
func (l *Logger) Run(ctx context.Context) error {
	enc := &encoder{l: l}
	buf := make([]byte, 0, batchBytes+4096)
	lines := uint64(0)
	add := func(it *item) error {
		n := len(buf)
		var err error
		if buf, err = enc.appendLine(buf, it.at, it.req, &it.d); err != nil {
			return err
		}
		if !it.d.Allowed {
			l.remember(buf[n:])
		}
		buf = append(buf, '\n')
		lines++
		*it = item{} // keep no request alive
		return nil
	}
	flush := func() error {
		if len(buf) == 0 {
			return nil
		}
		_, err := l.w.Write(buf)
		buf = buf[:0]
		if err != nil {
			return fmt.Errorf("decisionlog: %w", err)
		}
		l.written.Add(lines)
		lines = 0
		return nil
	}
	var linger *time.Timer
	if l.linger > 0 {
		linger = time.NewTimer(l.linger)
		defer linger.Stop()
	}
	for {
		select {
		case <-ctx.Done():
			for {
				select {
				case it := <-l.queue:
					if err := add(&it); err != nil {
						return err
					}
					if len(buf) >= batchBytes {
						if err := flush(); err != nil {
							return err
						}
					}
				default:
					return flush()
				}
			}
		case it := <-l.queue:
			if err := add(&it); err != nil {
				return err
			}
		batch:
			for len(buf) < batchBytes {
				select {
				case it := <-l.queue:
					if err := add(&it); err != nil {
						return err
					}
				default:
					break batch
				}
			}
			full := len(buf) >= batchBytes
			if err := flush(); err != nil {
				return err
			}
			if linger != nil && !full {
				linger.Reset(l.linger)
				select {
				case <-ctx.Done():
				case <-linger.C:
				}
			}
		}
	}
}

// batchBytes is about how much Run writes at once, at most.
const batchBytes = 64 << 10

// remember keeps a denial's line in the ring, dropping the oldest. The
// ring's slots are reused, so that a denial costs no allocation once the
// ring has gone round.
func (l *Logger) remember(line []byte) {
	l.dmu.Lock()
	i := l.next % uint64(len(l.denials))
	l.denials[i] = append(l.denials[i][:0], line...)
	l.next++
	l.dmu.Unlock()
}

// Recent returns up to limit of the last denials Run wrote, newest first,
// redacted as the log line is. A limit of zero or less, or above the
// ring's size, returns all it holds. Entries dropped from a full queue
// never reach it (Dropped counts them).
func (l *Logger) Recent(limit int) []Entry {
	l.dmu.Lock()
	defer l.dmu.Unlock()
	n := min(l.next, uint64(len(l.denials)))
	if limit > 0 && uint64(limit) < n {
		n = uint64(limit)
	}
	out := make([]Entry, 0, n)
	for i := uint64(1); i <= n; i++ {
		var e Entry
		// The line is this package's own encoding of an Entry.
		if err := json.Unmarshal(l.denials[(l.next-i)%uint64(len(l.denials))], &e); err != nil {
			continue
		}
		out = append(out, e)
	}
	return out
}

// Entry is one decision log line.
type Entry struct {
	DecisionID  string            `json:"decision_id"`
	Time        time.Time         `json:"time"`
	Source      Peer              `json:"source"`
	Destination Peer              `json:"destination"`
	Protocol    string            `json:"protocol"`
	Method      string            `json:"method,omitempty"`
	Host        string            `json:"host,omitempty"`
	Path        string            `json:"path,omitempty"`
	Headers     map[string]string `json:"headers,omitempty"`
	Allowed     bool              `json:"allowed"`
	HTTPStatus  int               `json:"http_status,omitempty"`
	Reason      string            `json:"reason"`
	Policy      string            `json:"policy,omitempty"`
	Rule        *int              `json:"rule,omitempty"`
	Action      string            `json:"action,omitempty"`
	Audit       []engine.Match    `json:"audit,omitempty"`
	DryRun      *engine.Shadow    `json:"dry_run,omitempty"`
	Error       string            `json:"error,omitempty"`
	// PolicyVersion and PolicyDigest name the policy snapshot in force
	// when the decision was made (authz/source.Snapshot).
	PolicyVersion uint64 `json:"policy_version,omitempty"`
	PolicyDigest  string `json:"policy_digest,omitempty"`
}

// Peer is one side of the connection.
type Peer struct {
	Principal string `json:"principal,omitempty"`
	Address   string `json:"address,omitempty"`
}

// Entry builds the (redacted) log entry of a decision.
func (l *Logger) Entry(at time.Time, req *authv3.CheckRequest, d *engine.Decision) Entry {
	a := req.GetAttributes()
	newID := l.newID
	if newID == nil {
		newID = uuid.NewString
	}
	e := Entry{
		DecisionID:  newID(),
		Time:        at.UTC(),
		Source:      Peer{Principal: a.GetSource().GetPrincipal(), Address: a.GetSource().GetAddress().GetSocketAddress().GetAddress()},
		Destination: Peer{Principal: a.GetDestination().GetPrincipal(), Address: a.GetDestination().GetAddress().GetSocketAddress().GetAddress()},
		Protocol:    "tcp",
		Allowed:     d.Allowed,
		Reason:      d.Reason,
		Policy:      d.Policy,
		Rule:        d.Rule,
		Action:      d.Action,
		Audit:       d.Audit,
		DryRun:      d.DryRun,
		Error:       l.red.Text(d.Error),

		PolicyVersion: d.PolicyVersion,
		PolicyDigest:  d.PolicyDigest,
	}
	if !d.Allowed {
		e.HTTPStatus = d.HTTPStatus
	}
	if h := a.GetRequest().GetHttp(); h != nil {
		e.Protocol = "http"
		e.Method, e.Host = h.GetMethod(), h.GetHost()
		e.Path = l.red.Path(h.GetPath())
		if len(h.GetHeaders()) > 0 {
			e.Headers = make(map[string]string, len(h.GetHeaders()))
			for k, v := range h.GetHeaders() {
				e.Headers[k] = l.red.Header(k, v)
			}
		}
	}
	return e
}

// redactPath replaces what the path patterns match in the path, keeps the
// query parameter names, and replaces values of parameters not
// allowlisted; a parameter not allowlisted that has no value is replaced
// whole.
func (r *Redactor) redactPath(p string) string {
	path, q, ok := strings.Cut(p, "?")
	path = r.paths.Redact(path)
	if !ok {
		return path
	}
	if i := strings.IndexByte(q, '#'); i >= 0 {
		q = q[:i]
	}
	parts := strings.Split(q, "&")
	for i, kv := range parts {
		k, _, hasValue := strings.Cut(kv, "=")
		name, err := url.QueryUnescape(k)
		if err != nil {
			name = k
		}
		switch {
		case r.query[name]:
		case hasValue:
			parts[i] = k + "=" + Redacted
		case k != "":
			// A parameter without a value ("?SECRETTOKEN") is all value.
			parts[i] = Redacted
		}
	}
	return path + "?" + strings.Join(parts, "&")
}
