// Package ui serves trustmesh's web page: the state of the mesh's security
// (identities, the CA, who may call whom, recent denials, the journal) at
// /ui/ on its own listener, and the JSON API under /ui/api/ that the page
// reads. The page's assets (assets/) are embedded; nothing is loaded from
// elsewhere.
//
// It is a security product's window, so every request passes the checks in
// security.go: the Host must be one of the listener's own names (against
// DNS rebinding), a request that changes anything must come from the
// page's own Origin and carry its CSRF token, a listener that is not on
// loopback needs a bearer token (wrong ones throttled per address) or a
// verified client certificate with an allowed SPIFFE ID, and
// every answer carries a strict Content-Security-Policy.
package ui

import (
	"context"
	"embed"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"math"
	"net"
	"net/http"
	"strconv"
	"strings"
	"sync"
	"time"

	"k8s.io/utils/clock"
)

//go:embed assets
var assets embed.FS

// Path prefixes.
const (
	Prefix       = "/ui/"
	APIPrefix    = "/ui/api/"
	StaticPrefix = "/ui/static/"
	LoginPath    = "/ui/login"
	LogoutPath   = "/ui/logout"
)

// Defaults.
const (
	DefaultVerifyInterval = 10 * time.Second
	DefaultSessionTTL     = 12 * time.Hour
	// DefaultDenials is how many denials /ui/api/denials returns unless
	// asked for fewer; MaxDenials is the most it returns.
	DefaultDenials = 100
	MaxDenials     = 1000
	// verifyTimeout bounds one verification, within the listener's write
	// timeout.
	verifyTimeout = 25 * time.Second
)

// Config configures the page's server.
type Config struct {
	// Addr is the address the listener is bound to (its Addr().String()):
	// it decides which Host names are the listener's own and whether
	// authentication is required.
	Addr string
	// AllowedHosts are further names the page may be reached by ("name"
	// with any port, or "name:port"), e.g. behind a Service or proxy.
	AllowedHosts []string
	// Token, when set, is the bearer token that authenticates a client,
	// sent as "Authorization: Bearer TOKEN" or exchanged at /ui/login for
	// a session cookie. Required, or ClientCerts, when Addr is not on
	// loopback.
	Token string
	// ClientCerts says the listener's TLS requires and verifies a client
	// certificate: a request with a verified chain whose leaf's SPIFFE ID
	// (URI SAN) is one of ClientIDs is authenticated.
	ClientCerts bool
	// ClientIDs are the SPIFFE IDs allowed in with a client certificate;
	// required with ClientCerts, since a CA (a mesh's bundle above all)
	// certifies many more clients than the UI's.
	ClientIDs []string

	Replica     string
	TrustDomain string

	Identities Identities
	CA         CA
	Access     Access
	Denials    Denials
	Journal    Journal

	// VerifyInterval is the least time between two journal verifications;
	// zero means DefaultVerifyInterval.
	VerifyInterval time.Duration
	// SessionTTL is how long a login lasts; zero means DefaultSessionTTL.
	SessionTTL time.Duration
	Clock      clock.PassiveClock
	Log        *slog.Logger
}

// Server is the page's http.Handler.
type Server struct {
	cfg      Config
	hosts    hostCheck
	authOn   bool
	static   fs.FS
	sessions *sessions
	csrfKey  []byte

	clientIDs map[string]bool
	fails     *failLimiter

	vmu        sync.Mutex
	lastVerify *VerifyResult
	verifyAt   time.Time // when the last verification started
}

// ErrNoAuth is returned by New for a listener off loopback with neither a
// token nor client certificates.
var ErrNoAuth = errors.New("ui: a listener that is not on loopback needs authentication: give a bearer token (--ui-token-file) or client certificates (--ui-client-ca with --ui-client-id)")

// ErrNoClientIDs is returned by New for client certificates without the
// SPIFFE IDs they may carry.
var ErrNoClientIDs = errors.New("ui: client certificates need the SPIFFE IDs allowed in (--ui-client-id): " +
	"any certificate from the client CA would do otherwise, and with the mesh's bundle that is every workload")

// New checks cfg and returns the page's handler. It refuses, failing
// closed, a listener that is not on loopback without authentication.
func New(cfg Config) (*Server, error) {
	if cfg.Clock == nil {
		cfg.Clock = clock.RealClock{}
	}
	if cfg.Log == nil {
		cfg.Log = slog.Default()
	}
	if cfg.VerifyInterval == 0 {
		cfg.VerifyInterval = DefaultVerifyInterval
	}
	if cfg.SessionTTL == 0 {
		cfg.SessionTTL = DefaultSessionTTL
	}
	if cfg.VerifyInterval < 0 || cfg.SessionTTL < 0 {
		return nil, errors.New("ui: the verify interval and the session lifetime must not be negative")
	}
	hosts, loopback, err := newHostCheck(cfg.Addr, cfg.AllowedHosts)
	if err != nil {
		return nil, err
	}
	if !loopback && cfg.Token == "" && !cfg.ClientCerts {
		return nil, ErrNoAuth
	}
	if err := CheckToken(cfg.Token); cfg.Token != "" && err != nil {
		return nil, err
	}
	clientIDs, err := parseClientIDs(cfg.ClientIDs)
	if err != nil {
		return nil, err
	}
	if cfg.ClientCerts && len(clientIDs) == 0 {
		return nil, ErrNoClientIDs
	}
	static, err := fs.Sub(assets, "assets")
	if err != nil {
		return nil, fmt.Errorf("ui: %w", err)
	}
	key, err := randomBytes(32)
	if err != nil {
		return nil, err
	}
	return &Server{
		cfg: cfg, hosts: hosts, authOn: cfg.Token != "" || cfg.ClientCerts || !loopback, static: static,
		sessions: newSessions(cfg.SessionTTL, maxSessions), csrfKey: key,
		clientIDs: clientIDs, fails: newFailLimiter(cfg.Log),
	}, nil
}

// ServeHTTP checks the request (security.go) and routes it.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	setSecurityHeaders(w.Header())
	if !s.hosts.allowed(r.Host) {
		// Not this listener's name: a DNS-rebinding page, or a name the
		// operator has not allowed (--ui-allowed-host).
		writeError(w, http.StatusMisdirectedRequest, fmt.Sprintf("host %q is not one of this listener's names (trustmesh serve --ui-allowed-host adds names)", r.Host))
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		if err := sameOrigin(r); err != nil {
			writeError(w, http.StatusForbidden, err.Error())
			return
		}
	}
	p := r.URL.Path
	switch {
	case p == "/" || p == "/ui":
		if !isRead(w, r) {
			return
		}
		http.Redirect(w, r, Prefix, http.StatusFound)
		return
	case strings.HasPrefix(p, StaticPrefix):
		// The assets are the same in every copy of the binary: served
		// without authentication, so that the login page has its style.
		s.serveStatic(w, r, strings.TrimPrefix(p, StaticPrefix))
		return
	case p == LoginPath:
		s.login(w, r)
		return
	case p == LogoutPath:
		s.logout(w, r)
		return
	}
	sid, code, why := s.authenticate(w, r)
	if code == http.StatusTooManyRequests || code == http.StatusForbidden {
		if why == "" {
			why = "too many wrong tokens from this address; try again later"
		}
		writeError(w, code, why)
		return
	}
	if code != 0 {
		if strings.HasPrefix(p, APIPrefix) {
			w.Header().Set("WWW-Authenticate", `Bearer realm="trustmesh"`)
			writeError(w, http.StatusUnauthorized, "authentication required: a bearer token, a session from "+LoginPath+", or a client certificate")
			return
		}
		if p == Prefix && isRead(w, r) {
			http.Redirect(w, r, LoginPath, http.StatusSeeOther)
		} else if p != Prefix {
			writeError(w, http.StatusUnauthorized, "authentication required")
		}
		return
	}
	switch {
	case p == Prefix:
		if isRead(w, r) {
			s.serveIndex(w, r)
		}
	case strings.HasPrefix(p, APIPrefix):
		s.api(w, r, strings.TrimPrefix(p, APIPrefix), sid)
	default:
		writeError(w, http.StatusNotFound, "not found")
	}
}

// isRead answers 405 unless r is a GET or HEAD.
func isRead(w http.ResponseWriter, r *http.Request) bool {
	if r.Method == http.MethodGet || r.Method == http.MethodHead {
		return true
	}
	w.Header().Set("Allow", "GET, HEAD")
	writeError(w, http.StatusMethodNotAllowed, r.Method+" is not allowed here")
	return false
}

func (s *Server) serveIndex(w http.ResponseWriter, r *http.Request) {
	b, err := fs.ReadFile(s.static, "index.html")
	if err != nil {
		writeError(w, http.StatusInternalServerError, "the page is missing from this build")
		return
	}
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	if r.Method == http.MethodHead {
		return
	}
	_, _ = w.Write(b)
}

func (s *Server) serveStatic(w http.ResponseWriter, r *http.Request, name string) {
	if !isRead(w, r) {
		return
	}
	if name == "" || name == "index.html" || !fs.ValidPath(name) {
		writeError(w, http.StatusNotFound, "not found")
		return
	}
	if fi, err := fs.Stat(s.static, name); err != nil || fi.IsDir() {
		writeError(w, http.StatusNotFound, "not found")
		return
	}
	w.Header().Set("Cache-Control", "no-cache")
	http.ServeFileFS(w, r, s.static, name)
}

// api serves /ui/api/NAME.
func (s *Server) api(w http.ResponseWriter, r *http.Request, name, sid string) {
	w.Header().Set("Cache-Control", "no-store")
	if name == "journal/verify" {
		if r.Method != http.MethodPost {
			w.Header().Set("Allow", "POST")
			writeError(w, http.StatusMethodNotAllowed, "verify is a POST with the CSRF token")
			return
		}
		s.verify(w, r, sid)
		return
	}
	h, ok := map[string]func(*http.Request, string) (any, error){
		"session":    s.session,
		"identities": s.identities,
		"ca":         s.ca,
		"access":     s.access,
		"denials":    s.denials,
		"journal":    s.journal,
	}[name]
	if !ok {
		writeError(w, http.StatusNotFound, "no such API: "+name)
		return
	}
	if !isRead(w, r) {
		return
	}
	v, err := h(r, sid)
	if err != nil {
		var he *httpError
		if errors.As(err, &he) {
			writeError(w, he.code, he.msg)
			return
		}
		if errors.Is(err, ErrNotLoaded) {
			w.Header().Set("Retry-After", "1")
			writeError(w, http.StatusServiceUnavailable, name+": "+err.Error())
			return
		}
		s.cfg.Log.Warn("web UI: a view failed", "view", name, "error", err)
		writeError(w, http.StatusInternalServerError, name+": "+err.Error())
		return
	}
	writeJSON(w, http.StatusOK, v)
}

// ErrNotLoaded is what a view's source returns (wrapped) before what it
// shows has been loaded, such as the access view before the first policy
// snapshot: the page answers 503 and tries again, rather than show a view
// computed from nothing, which for access would read "allowed" everywhere.
var ErrNotLoaded = errors.New("not loaded yet")

type httpError struct {
	code int
	msg  string
}

func (e *httpError) Error() string { return e.msg }

func (s *Server) now() time.Time { return s.cfg.Clock.Now().UTC() }

func (s *Server) session(_ *http.Request, sid string) (any, error) {
	return Session{Replica: s.cfg.Replica, TrustDomain: s.cfg.TrustDomain, CSRFToken: s.csrfToken(sid), Now: s.now()}, nil
}

func (s *Server) identities(r *http.Request, _ string) (any, error) {
	now := s.now()
	v := IdentitiesView{At: now, Identities: []Identity{}}
	if s.cfg.Identities != nil {
		ids, err := s.cfg.Identities.Identities(r.Context(), now)
		if err != nil {
			return nil, err
		}
		if ids != nil {
			v.Identities = ids
		}
	}
	return v, nil
}

func (s *Server) ca(r *http.Request, _ string) (any, error) {
	v := &CAView{}
	if s.cfg.CA != nil {
		var err error
		if v, err = s.cfg.CA.CA(r.Context(), s.now()); err != nil {
			return nil, err
		}
	}
	if v.Generations == nil {
		v.Generations = []Generation{}
	}
	if v.Events == nil {
		v.Events = []CAEvent{}
	}
	if v.NextExpiries == nil {
		v.NextExpiries = []Expiry{}
	}
	return v, nil
}

func (s *Server) access(r *http.Request, _ string) (any, error) {
	v := &AccessView{}
	if s.cfg.Access != nil {
		var err error
		if v, err = s.cfg.Access.Access(r.Context()); err != nil {
			return nil, err
		}
	}
	if v.Services == nil {
		v.Services = []any{}
	}
	if v.Cells == nil {
		v.Cells = []any{}
	}
	return v, nil
}

func (s *Server) denials(r *http.Request, _ string) (any, error) {
	limit := DefaultDenials
	if q := r.URL.Query().Get("limit"); q != "" {
		n, err := strconv.Atoi(q)
		if err != nil || n < 1 || n > MaxDenials {
			return nil, &httpError{http.StatusBadRequest, fmt.Sprintf("limit %q is not a number from 1 to %d", q, MaxDenials)}
		}
		limit = n
	}
	v := DenialsView{Replica: s.cfg.Replica, Denials: []Denial{}}
	if s.cfg.Denials != nil {
		var ds []Denial
		ds, v.Logging, v.Dropped = s.cfg.Denials.Denials(limit)
		if ds != nil {
			v.Denials = ds
		}
	}
	return v, nil
}

func (s *Server) journal(r *http.Request, _ string) (any, error) {
	v := &JournalView{}
	if s.cfg.Journal != nil {
		var err error
		if v, err = s.cfg.Journal.Journal(r.Context()); err != nil {
			return nil, err
		}
	}
	s.vmu.Lock()
	v.LastVerify = s.lastVerify
	s.vmu.Unlock()
	return v, nil
}

// verify runs the journal verification: a POST from the page's origin
// with its CSRF token, at most once per VerifyInterval.
func (s *Server) verify(w http.ResponseWriter, r *http.Request, sid string) {
	if !s.validCSRF(r, sid) {
		writeError(w, http.StatusForbidden, "missing or wrong CSRF token (header "+CSRFHeader+", from /ui/api/session)")
		return
	}
	if s.cfg.Journal == nil {
		writeError(w, http.StatusNotFound, "this control plane has no journal to verify")
		return
	}
	now := s.cfg.Clock.Now()
	s.vmu.Lock()
	if wait := s.cfg.VerifyInterval - now.Sub(s.verifyAt); !s.verifyAt.IsZero() && wait > 0 {
		s.vmu.Unlock()
		w.Header().Set("Retry-After", strconv.Itoa(int(math.Ceil(wait.Seconds()))))
		writeError(w, http.StatusTooManyRequests, fmt.Sprintf("the journal was verified less than %s ago; try again in %s", s.cfg.VerifyInterval, wait.Round(time.Second)))
		return
	}
	s.verifyAt = now
	s.vmu.Unlock()
	ctx, cancel := context.WithTimeout(r.Context(), verifyTimeout)
	defer cancel()
	res, err := s.cfg.Journal.Verify(ctx)
	if err != nil {
		s.cfg.Log.Warn("web UI: journal verification failed to run", "error", err)
		writeError(w, http.StatusInternalServerError, "the verification could not run: "+err.Error())
		return
	}
	if res.Findings == nil {
		res.Findings = []Finding{}
	}
	res.OK = len(res.Findings) == 0
	res.At = s.now()
	s.vmu.Lock()
	s.lastVerify = res
	s.vmu.Unlock()
	writeJSON(w, http.StatusOK, res)
}

func writeJSON(w http.ResponseWriter, code int, v any) {
	b, err := json.Marshal(v)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

func writeError(w http.ResponseWriter, code int, msg string) {
	b, _ := json.Marshal(map[string]string{"error": msg})
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_, _ = w.Write(append(b, '\n'))
}

// IsLoopback reports whether a listen address ("host:port") is on
// loopback: localhost, 127.0.0.0/8 or ::1. A wildcard or any other
// address is not.
func IsLoopback(addr string) bool {
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return false
	}
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip := net.ParseIP(host)
	return ip != nil && ip.IsLoopback()
}
