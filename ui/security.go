package ui

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"errors"
	"fmt"
	"html/template"
	"net"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

// CSRFHeader carries the CSRF token of /ui/api/session on a POST.
const CSRFHeader = "X-Trustmesh-CSRF"

// SessionCookie holds a login's session id.
const SessionCookie = "trustmesh_ui_session"

// MinTokenLength is the shortest bearer token accepted, and
// MinTokenDistinct the fewest different characters in it.
const (
	MinTokenLength   = 16
	MinTokenDistinct = 8
)

// CheckToken refuses a bearer token that is easy to guess: shorter than
// MinTokenLength, of fewer than MinTokenDistinct different characters
// ("aaaaaaaaaaaaaaaa", "abababababababab"), or more than one word.
func CheckToken(tok string) error {
	distinct := map[rune]bool{}
	for _, c := range tok {
		distinct[c] = true
	}
	switch {
	case len(tok) < MinTokenLength:
		return fmt.Errorf("ui: the token has %d characters; it needs at least %d", len(tok), MinTokenLength)
	case len(distinct) < MinTokenDistinct:
		return fmt.Errorf("ui: the token has only %d different characters; it needs at least %d (make one with: head -c 24 /dev/urandom | base64)", len(distinct), MinTokenDistinct)
	case strings.ContainsAny(tok, " \t\r\n"):
		return errors.New("ui: the token is more than one word")
	}
	return nil
}

// maxSessions bounds the logins held at once; the oldest goes first.
const maxSessions = 1024

// ContentSecurityPolicy is sent with every answer: everything from this
// host only, no inline script or style, no framing, no plugins.
const ContentSecurityPolicy = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; " +
	"connect-src 'self'; font-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

func setSecurityHeaders(h http.Header) {
	h.Set("Content-Security-Policy", ContentSecurityPolicy)
	h.Set("X-Content-Type-Options", "nosniff")
	h.Set("X-Frame-Options", "DENY")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("Cross-Origin-Opener-Policy", "same-origin")
	h.Set("Cross-Origin-Resource-Policy", "same-origin")
	h.Set("Permissions-Policy", "camera=(), microphone=(), geolocation=()")
}

// hostCheck decides which Host headers name this listener.
type hostCheck struct {
	port string
	// exact are "host:port" names; anyPort are names with any port.
	exact, anyPort map[string]bool
}

// newHostCheck builds the check for a listener bound to addr: the loopback
// names (with any port: only this machine reaches them, and a rebinding
// page's Host is its own name, never these; a port-forward may change the
// port), the bound address itself unless a wildcard, and the allowed
// names. It reports whether addr is on loopback.
func newHostCheck(addr string, allowed []string) (hostCheck, bool, error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return hostCheck{}, false, fmt.Errorf("ui: listen address %q: %w", addr, err)
	}
	hc := hostCheck{port: port, exact: map[string]bool{}, anyPort: map[string]bool{"localhost": true, "127.0.0.1": true, "[::1]": true}}
	ip := net.ParseIP(host)
	if ip != nil && !ip.IsUnspecified() {
		hc.exact[strings.ToLower(net.JoinHostPort(ip.String(), port))] = true
	}
	for _, a := range allowed {
		a = strings.ToLower(strings.TrimSpace(a))
		if a == "" || strings.ContainsAny(a, "/ \t*") {
			return hostCheck{}, false, fmt.Errorf("ui: allowed host %q is not a host name or host:port", a)
		}
		if h, p, err := net.SplitHostPort(a); err == nil {
			if _, err := strconv.ParseUint(p, 10, 16); err != nil {
				return hostCheck{}, false, fmt.Errorf("ui: allowed host %q: port %q is not a number", a, p)
			}
			hc.exact[net.JoinHostPort(strings.TrimSuffix(h, "."), p)] = true
			continue
		}
		if ip := net.ParseIP(strings.Trim(a, "[]")); ip != nil && ip.To4() == nil {
			a = "[" + ip.String() + "]"
		}
		hc.anyPort[strings.TrimSuffix(a, ".")] = true
	}
	loopback := strings.EqualFold(host, "localhost") || ip != nil && ip.IsLoopback()
	return hc, loopback, nil
}

// allowed reports whether a request's Host names this listener.
func (hc hostCheck) allowed(hostport string) bool {
	hostport = strings.ToLower(hostport)
	host, port, err := net.SplitHostPort(hostport)
	if err != nil {
		// No port: the scheme's default.
		host, port = strings.Trim(hostport, "[]"), ""
	}
	host = strings.TrimSuffix(host, ".")
	if host == "" {
		return false
	}
	bracketed := host
	if strings.Contains(host, ":") {
		bracketed = "[" + host + "]"
	}
	if hc.anyPort[bracketed] {
		return true
	}
	return port != "" && hc.exact[net.JoinHostPort(host, port)]
}

// sameOrigin refuses a request that changes something unless it comes
// from the page's own origin: the Origin header (which every browser sends
// with a POST) must be this request's scheme and Host.
func sameOrigin(r *http.Request) error {
	origin := r.Header.Get("Origin")
	if origin == "" {
		return errors.New("a request that changes anything must carry the page's Origin")
	}
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	u, err := url.Parse(origin)
	if err != nil || u.Scheme != scheme || !strings.EqualFold(u.Host, r.Host) || u.Path != "" || u.User != nil {
		return fmt.Errorf("origin %q is not this page's (%s://%s)", origin, scheme, r.Host)
	}
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" && site != "same-origin" {
		return fmt.Errorf("a %s request (Sec-Fetch-Site) may not change anything", site)
	}
	return nil
}

// authenticate decides whether r may see the page. It returns the
// session id (empty for a bearer token, a client certificate or loopback
// without a token), or the status to refuse with and why: 401, 403 for a
// client certificate whose SPIFFE ID is not allowed, or 429 (with
// Retry-After set on w) after too many wrong tokens from r's address.
func (s *Server) authenticate(w http.ResponseWriter, r *http.Request) (sid string, code int, why string) {
	if !s.authOn {
		return "", 0, ""
	}
	if s.cfg.ClientCerts && r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && len(r.TLS.PeerCertificates) > 0 {
		id, err := x509svid.IDFromCert(r.TLS.PeerCertificates[0])
		if err == nil && s.clientIDs[id.String()] {
			return "", 0, ""
		}
		if s.cfg.Token == "" {
			// A certificate from the CA is not enough: every workload
			// of a mesh whose bundle is the client CA has one.
			if err != nil {
				return "", http.StatusForbidden, "the client certificate has no SPIFFE ID: " + err.Error()
			}
			return "", http.StatusForbidden, fmt.Sprintf("the client certificate's SPIFFE ID %s is not one the web UI allows (trustmesh serve --ui-client-id)", id)
		}
	}
	if s.cfg.Token == "" {
		return "", http.StatusUnauthorized, ""
	}
	if tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer "); ok {
		code := s.checkToken(w, r, tok, "bearer")
		return "", code, ""
	}
	if c, err := r.Cookie(SessionCookie); err == nil && s.sessions.valid(c.Value, s.cfg.Clock.Now()) {
		return c.Value, 0, ""
	}
	return "", http.StatusUnauthorized, ""
}

// checkToken compares tok with the token, throttled per client address
// (limiter.go): it answers 0 for the right token, 401 for a wrong one, and
// 429 with Retry-After set on w when r's address has no attempts left.
func (s *Server) checkToken(w http.ResponseWriter, r *http.Request, tok, via string) int {
	ip := clientIP(r)
	ok, wait := s.fails.take(ip, s.cfg.Clock.Now(), via)
	if !ok {
		w.Header().Set("Retry-After", retryAfter(wait))
		return http.StatusTooManyRequests
	}
	if !s.tokenMatches(tok) {
		return http.StatusUnauthorized
	}
	s.fails.giveBack(ip)
	return 0
}

// tokenMatches compares in constant time (over the hashes, so that not
// even the length leaks).
func (s *Server) tokenMatches(tok string) bool {
	a, b := sha256.Sum256([]byte(tok)), sha256.Sum256([]byte(s.cfg.Token))
	return subtle.ConstantTimeCompare(a[:], b[:]) == 1
}

// csrfToken is bound to the session: a token from one login is no good
// with another's cookie.
func (s *Server) csrfToken(sid string) string {
	m := hmac.New(sha256.New, s.csrfKey)
	m.Write([]byte("csrf\x00" + sid))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

func (s *Server) validCSRF(r *http.Request, sid string) bool {
	got := r.Header.Get(CSRFHeader)
	want := s.csrfToken(sid)
	return got != "" && subtle.ConstantTimeCompare([]byte(got), []byte(want)) == 1
}

var loginPage = template.Must(template.New("login").Parse(`<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>trustmesh: sign in</title>
<link rel="stylesheet" href="/ui/static/style.css">
</head>
<body>
<main id="login">
<h1>trustmesh</h1>
<form method="post" action="/ui/login">
<label for="token">Access token</label>
<input id="token" name="token" type="password" autocomplete="current-password" required>
<button type="submit">Sign in</button>
</form>
{{if .}}<p role="alert">{{.}}</p>{{end}}
</main>
</body>
</html>
`))

// login serves the form (GET) and exchanges the token for a session
// cookie (POST, same origin only). Wrong tokens are throttled per client
// address, with the bearer header's (checkToken).
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	switch r.Method {
	case http.MethodGet, http.MethodHead:
		s.loginForm(w, http.StatusOK, "")
		return
	case http.MethodPost:
	default:
		w.Header().Set("Allow", "GET, HEAD, POST")
		writeError(w, http.StatusMethodNotAllowed, r.Method+" is not allowed here")
		return
	}
	if s.cfg.Token == "" {
		writeError(w, http.StatusNotFound, "this page is not behind a token")
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 4<<10)
	if err := r.ParseForm(); err != nil {
		writeError(w, http.StatusBadRequest, "bad login form: "+err.Error())
		return
	}
	switch s.checkToken(w, r, r.PostForm.Get("token"), "login") {
	case http.StatusTooManyRequests:
		s.loginForm(w, http.StatusTooManyRequests, "Too many wrong tokens from this address; wait a few seconds.")
		return
	case http.StatusUnauthorized:
		s.loginForm(w, http.StatusUnauthorized, "That token is not right.")
		return
	}
	now := s.cfg.Clock.Now()
	sid, err := s.sessions.create(now)
	if err != nil {
		writeError(w, http.StatusInternalServerError, err.Error())
		return
	}
	http.SetCookie(w, &http.Cookie{
		Name: SessionCookie, Value: sid, Path: Prefix, MaxAge: int(s.cfg.SessionTTL / time.Second),
		HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode,
	})
	http.Redirect(w, r, Prefix, http.StatusSeeOther)
}

func (s *Server) loginForm(w http.ResponseWriter, code int, msg string) {
	w.Header().Set("Content-Type", "text/html; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	_ = loginPage.Execute(w, msg)
}

// logout ends the session (POST, same origin only).
func (s *Server) logout(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", "POST")
		writeError(w, http.StatusMethodNotAllowed, "logout is a POST")
		return
	}
	if c, err := r.Cookie(SessionCookie); err == nil {
		s.sessions.remove(c.Value)
	}
	http.SetCookie(w, &http.Cookie{Name: SessionCookie, Value: "", Path: Prefix, MaxAge: -1, HttpOnly: true, Secure: r.TLS != nil, SameSite: http.SameSiteStrictMode})
	http.Redirect(w, r, LoginPath, http.StatusSeeOther)
}

// sessions are the logins in force, in memory: a restart signs everyone
// out.
type sessions struct {
	mu  sync.Mutex
	ttl time.Duration
	max int
	by  map[string]time.Time // id -> expiry
}

func newSessions(ttl time.Duration, max int) *sessions {
	return &sessions{ttl: ttl, max: max, by: map[string]time.Time{}}
}

func (ss *sessions) create(now time.Time) (string, error) {
	b, err := randomBytes(32)
	if err != nil {
		return "", err
	}
	id := base64.RawURLEncoding.EncodeToString(b)
	ss.mu.Lock()
	defer ss.mu.Unlock()
	for k, exp := range ss.by {
		if !now.Before(exp) {
			delete(ss.by, k)
		}
	}
	for len(ss.by) >= ss.max {
		var oldest string
		for k, exp := range ss.by {
			if oldest == "" || exp.Before(ss.by[oldest]) {
				oldest = k
			}
		}
		delete(ss.by, oldest)
	}
	ss.by[id] = now.Add(ss.ttl)
	return id, nil
}

func (ss *sessions) valid(id string, now time.Time) bool {
	ss.mu.Lock()
	defer ss.mu.Unlock()
	exp, ok := ss.by[id]
	return ok && now.Before(exp)
}

func (ss *sessions) remove(id string) {
	ss.mu.Lock()
	delete(ss.by, id)
	ss.mu.Unlock()
}

func randomBytes(n int) ([]byte, error) {
	b := make([]byte, n)
	if _, err := rand.Read(b); err != nil {
		return nil, fmt.Errorf("ui: %w", err)
	}
	return b, nil
}

// parseClientIDs parses --ui-client-id values: exact SPIFFE IDs.
func parseClientIDs(ids []string) (map[string]bool, error) {
	set := map[string]bool{}
	for _, v := range ids {
		id, err := spiffeid.FromString(v)
		if err != nil {
			return nil, fmt.Errorf("ui: client ID %q is not a SPIFFE ID: %w", v, err)
		}
		set[id.String()] = true
	}
	return set, nil
}

// CheckClientIDs checks --ui-client-id values as New does.
func CheckClientIDs(ids []string) error {
	_, err := parseClientIDs(ids)
	return err
}

// CheckAllowedHosts checks --ui-allowed-host values as New does.
func CheckAllowedHosts(hosts []string) error {
	_, _, err := newHostCheck("127.0.0.1:0", hosts)
	return err
}
