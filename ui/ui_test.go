package ui

import (
	"context"
	"encoding/json"
	"errors"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	testclock "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/audit"
)

var t0 = time.Date(2026, 12, 5, 12, 0, 0, 0, time.UTC)

const token = "0123456789abcdef-token"

type fakeJournal struct{ verified int }

func (f *fakeJournal) Journal(context.Context) (*JournalView, error) {
	return &JournalView{Size: 3, Checkpoint: Checkpoint{Size: 3, RootHash: "cm9vdA==", Text: "note"}, Witness: WitnessState{State: "not configured"}}, nil
}

func (f *fakeJournal) Verify(context.Context) (*VerifyResult, error) {
	f.verified++
	idx := uint64(2)
	return &VerifyResult{Checked: 3, Findings: []Finding{{Index: &idx, Detail: "altered-entry: entry 2"}}}, nil
}

type fakeDenials struct{}

func (fakeDenials) Denials(limit int) ([]Denial, bool, uint64) {
	return []Denial{{DecisionID: "d1", Time: t0, Reason: "denied"}}[:min(limit, 1)], true, 4
}

func newServer(t *testing.T, cfg Config) (*Server, *testclock.FakePassiveClock) {
	t.Helper()
	clk := testclock.NewFakePassiveClock(t0)
	cfg.Clock = clk
	if cfg.Addr == "" {
		cfg.Addr = "127.0.0.1:15018"
	}
	s, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return s, clk
}

type req struct {
	method, path, host, origin, csrf, bearer string
	cookie                                   *http.Cookie
	body                                     string
}

func do(s http.Handler, r req) *httptest.ResponseRecorder {
	if r.method == "" {
		r.method = http.MethodGet
	}
	var body io.Reader
	if r.body != "" {
		body = strings.NewReader(r.body)
	}
	hr := httptest.NewRequest(r.method, r.path, body)
	hr.Host = "127.0.0.1:15018"
	if r.host == "-" {
		hr.Host = ""
	} else if r.host != "" {
		hr.Host = r.host
	}
	if r.origin != "" {
		hr.Header.Set("Origin", r.origin)
	}
	if r.csrf != "" {
		hr.Header.Set(CSRFHeader, r.csrf)
	}
	if r.bearer != "" {
		hr.Header.Set("Authorization", "Bearer "+r.bearer)
	}
	if r.cookie != nil {
		hr.AddCookie(r.cookie)
	}
	if r.body != "" {
		hr.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	w := httptest.NewRecorder()
	s.ServeHTTP(w, hr)
	return w
}

func decode(t *testing.T, w *httptest.ResponseRecorder) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(w.Body.Bytes(), &m); err != nil {
		t.Fatalf("body %q: %v", w.Body.String(), err)
	}
	return m
}

func csrf(t *testing.T, s http.Handler, r req) string {
	t.Helper()
	r.path = "/ui/api/session"
	w := do(s, r)
	if w.Code != 200 {
		t.Fatalf("session: %d %s", w.Code, w.Body)
	}
	return decode(t, w)["csrf_token"].(string)
}

// TestHostCheck: only the listener's own names are served, against DNS
// rebinding; --ui-allowed-host adds names.
func TestHostCheck(t *testing.T) {
	s, _ := newServer(t, Config{AllowedHosts: []string{"ui.example.com", "proxy.example.com:8443"}})
	for host, want := range map[string]int{
		"127.0.0.1:15018":        200,
		"localhost:15018":        200,
		"LOCALHOST:8080":         200, // a port-forward
		"[::1]:15018":            200,
		"localhost.:15018":       200,
		"ui.example.com":         200,
		"ui.example.com:443":     200,
		"proxy.example.com:8443": 200,
		"proxy.example.com":      421,
		"evil.example:15018":     421, // a rebinding page's own name
		"127.0.0.2:15018":        421,
		"-":                      421, // none
		"localhost.evil.example": 421,
	} {
		if w := do(s, req{path: "/ui/api/session", host: host}); w.Code != want {
			t.Errorf("Host %q: %d, want %d", host, w.Code, want)
		}
	}
}

func TestSecurityHeaders(t *testing.T) {
	s, _ := newServer(t, Config{})
	for _, p := range []string{"/ui/", "/ui/api/session", "/ui/api/nosuch", "/ui/static/index.html"} {
		w := do(s, req{path: p})
		h := w.Header()
		if h.Get("Content-Security-Policy") != ContentSecurityPolicy || h.Get("X-Content-Type-Options") != "nosniff" ||
			h.Get("Referrer-Policy") != "no-referrer" || !strings.Contains(h.Get("Content-Security-Policy"), "frame-ancestors 'none'") {
			t.Errorf("%s: headers %v", p, h)
		}
		if strings.Contains(h.Get("Content-Security-Policy"), "unsafe-inline") {
			t.Errorf("%s: the CSP allows inline code", p)
		}
	}
	if w := do(s, req{path: "/ui/api/session"}); w.Header().Get("Cache-Control") != "no-store" {
		t.Errorf("API Cache-Control = %q", w.Header().Get("Cache-Control"))
	}
}

// TestVerifyNeedsOriginAndCSRF: verify is a POST from the page's origin
// with the session's CSRF token; anything else is refused and runs nothing.
func TestVerifyNeedsOriginAndCSRF(t *testing.T) {
	j := &fakeJournal{}
	s, _ := newServer(t, Config{Journal: j})
	tok := csrf(t, s, req{})
	const self = "http://127.0.0.1:15018"
	for name, r := range map[string]req{
		"no origin":          {csrf: tok},
		"foreign origin":     {origin: "http://evil.example", csrf: tok},
		"null origin":        {origin: "null", csrf: tok},
		"https origin":       {origin: "https://127.0.0.1:15018", csrf: tok},
		"no token":           {origin: self},
		"wrong token":        {origin: self, csrf: tok + "x"},
		"another's token":    {origin: self, csrf: (&Server{csrfKey: []byte("other")}).csrfToken("")},
		"origin on a subdir": {origin: self + "/x", csrf: tok},
	} {
		r.method, r.path = http.MethodPost, "/ui/api/journal/verify"
		if w := do(s, r); w.Code != http.StatusForbidden {
			t.Errorf("%s: %d %s, want 403", name, w.Code, w.Body)
		}
	}
	if j.verified != 0 {
		t.Fatalf("a refused request ran the verification %d times", j.verified)
	}
	if w := do(s, req{method: http.MethodGet, path: "/ui/api/journal/verify"}); w.Code != http.StatusMethodNotAllowed {
		t.Errorf("GET verify: %d", w.Code)
	}
	w := do(s, req{method: http.MethodPost, path: "/ui/api/journal/verify", origin: self, csrf: tok})
	if w.Code != 200 || j.verified != 1 {
		t.Fatalf("a good verify: %d %s", w.Code, w.Body)
	}
	m := decode(t, w)
	f := m["findings"].([]any)[0].(map[string]any)
	if m["ok"] != false || m["checked"] != 3.0 || f["index"] != 2.0 || m["at"] != "2026-12-05T12:00:00Z" {
		t.Errorf("verify result %v", m)
	}
	// The journal view shows the last result.
	if lv := decode(t, do(s, req{path: "/ui/api/journal"}))["last_verify"]; lv == nil {
		t.Error("journal.last_verify is null after a verification")
	}
}

// TestVerifyRateLimited: a second verify within the interval gets 429 and
// Retry-After, and runs nothing.
func TestVerifyRateLimited(t *testing.T) {
	j := &fakeJournal{}
	s, clk := newServer(t, Config{Journal: j})
	tok := csrf(t, s, req{})
	r := req{method: http.MethodPost, path: "/ui/api/journal/verify", origin: "http://127.0.0.1:15018", csrf: tok}
	if w := do(s, r); w.Code != 200 {
		t.Fatalf("first: %d", w.Code)
	}
	clk.SetTime(t0.Add(3 * time.Second))
	w := do(s, r)
	if w.Code != http.StatusTooManyRequests || w.Header().Get("Retry-After") != "7" || j.verified != 1 {
		t.Fatalf("second within 10s: %d Retry-After %q, ran %d", w.Code, w.Header().Get("Retry-After"), j.verified)
	}
	clk.SetTime(t0.Add(10 * time.Second))
	if w := do(s, r); w.Code != 200 || j.verified != 2 {
		t.Fatalf("after the interval: %d", w.Code)
	}
}

// TestOffLoopbackNeedsAuthentication: New refuses a listener off loopback
// without a token or client certificates; with a token, nothing but the
// assets and the login form answers without it.
func TestOffLoopbackNeedsAuthentication(t *testing.T) {
	for _, addr := range []string{"0.0.0.0:15018", "[::]:15018", "10.1.2.3:15018", ":15018"} {
		if _, err := New(Config{Addr: addr}); !errors.Is(err, ErrNoAuth) {
			t.Errorf("%s without auth: %v, want ErrNoAuth", addr, err)
		}
	}
	if _, err := New(Config{Addr: "0.0.0.0:1", Token: "short"}); err == nil {
		t.Error("a 5-character token was accepted")
	}
	s, _ := newServer(t, Config{Addr: "0.0.0.0:15018", Token: token})
	for _, p := range []string{"/ui/api/session", "/ui/api/identities", "/ui/api/journal"} {
		if w := do(s, req{path: p, host: "localhost:15018"}); w.Code != 401 || w.Header().Get("WWW-Authenticate") == "" {
			t.Errorf("%s without a token: %d", p, w.Code)
		}
		if w := do(s, req{path: p, host: "localhost:15018", bearer: "wrong-token-0123456789"}); w.Code != 401 {
			t.Errorf("%s with a wrong token: %d", p, w.Code)
		}
		if w := do(s, req{path: p, host: "localhost:15018", bearer: token}); w.Code != 200 {
			t.Errorf("%s with the token: %d %s", p, w.Code, w.Body)
		}
	}
	if w := do(s, req{path: "/ui/", host: "localhost:15018"}); w.Code != http.StatusSeeOther || w.Header().Get("Location") != LoginPath {
		t.Errorf("the page without a session: %d %v", w.Code, w.Header())
	}
	// A loopback listener with a token requires it too.
	s, _ = newServer(t, Config{Token: token})
	if w := do(s, req{path: "/ui/api/session"}); w.Code != 401 {
		t.Errorf("loopback with a token, none sent: %d", w.Code)
	}
}

// TestLogin exchanges the token for a session cookie that is HttpOnly,
// SameSite=Strict and scoped to /ui/; a wrong token gets none.
func TestLogin(t *testing.T) {
	s, clk := newServer(t, Config{Addr: "0.0.0.0:15018", Token: token})
	const host, origin = "localhost:15018", "http://localhost:15018"
	form := url.Values{"token": {token}}.Encode()
	if w := do(s, req{method: http.MethodPost, path: LoginPath, host: host, body: form}); w.Code != 403 {
		t.Errorf("login without Origin: %d", w.Code)
	}
	if w := do(s, req{method: http.MethodPost, path: LoginPath, host: host, origin: "http://evil.example", body: form}); w.Code != 403 {
		t.Errorf("login from a foreign origin: %d", w.Code)
	}
	w := do(s, req{method: http.MethodPost, path: LoginPath, host: host, origin: origin, body: url.Values{"token": {"nope-nope-nope-nope"}}.Encode()})
	if w.Code != 401 || len(w.Result().Cookies()) != 0 {
		t.Fatalf("a wrong token: %d, cookies %v", w.Code, w.Result().Cookies())
	}
	// (Wrong tokens are throttled per address: TestTokenGuessingThrottled.)
	clk.SetTime(t0.Add(time.Second))
	w = do(s, req{method: http.MethodPost, path: LoginPath, host: host, origin: origin, body: form})
	cs := w.Result().Cookies()
	if w.Code != http.StatusSeeOther || len(cs) != 1 {
		t.Fatalf("login: %d, cookies %v", w.Code, cs)
	}
	c := cs[0]
	if c.Name != SessionCookie || !c.HttpOnly || c.SameSite != http.SameSiteStrictMode || c.Path != Prefix || c.MaxAge <= 0 {
		t.Errorf("session cookie %+v: want HttpOnly, SameSite=Strict, Path=/ui/", c)
	}
	if w := do(s, req{path: "/ui/api/session", host: host, cookie: &http.Cookie{Name: SessionCookie, Value: c.Value}}); w.Code != 200 {
		t.Fatalf("API with the session: %d", w.Code)
	}
	// The CSRF token is the session's: another session's is refused.
	sess := &http.Cookie{Name: SessionCookie, Value: c.Value}
	tok := csrf(t, s, req{host: host, cookie: sess})
	if tok == csrf(t, s, req{host: host, bearer: token}) {
		t.Error("the session's CSRF token is the same as a bearer client's")
	}
	// The session ends with its lifetime.
	clk.SetTime(t0.Add(DefaultSessionTTL + 2*time.Second))
	if w := do(s, req{path: "/ui/api/session", host: host, cookie: sess}); w.Code != 401 {
		t.Errorf("an expired session: %d", w.Code)
	}
	if w := do(s, req{path: "/ui/api/session", host: host, cookie: &http.Cookie{Name: SessionCookie, Value: "forged"}}); w.Code != 401 {
		t.Errorf("a forged session: %d", w.Code)
	}
}

// TestJSONShapes: every view answers with every field, lists empty and
// never null, even with no data source.
func TestJSONShapes(t *testing.T) {
	s, _ := newServer(t, Config{Replica: "r1", TrustDomain: "td"})
	for path, fields := range map[string][]string{
		"/ui/api/session":    {"replica", "trust_domain", "csrf_token", "now"},
		"/ui/api/identities": {"at", "identities"},
		"/ui/api/ca":         {"generations", "events", "next_expiries"},
		"/ui/api/access":     {"policy_version", "mesh_version", "services", "cells"},
		"/ui/api/denials":    {"replica", "logging", "dropped", "denials"},
		"/ui/api/journal":    {"size", "checkpoint", "witness", "last_verify"},
	} {
		w := do(s, req{path: path})
		if w.Code != 200 || w.Header().Get("Content-Type") != "application/json" {
			t.Errorf("%s: %d %s", path, w.Code, w.Header().Get("Content-Type"))
			continue
		}
		m := decode(t, w)
		for _, f := range fields {
			v, ok := m[f]
			if !ok {
				t.Errorf("%s: no field %q in %v", path, f, m)
			}
			if f != "last_verify" && v == nil {
				t.Errorf("%s: %q is null", path, f)
			}
		}
	}
	if w := do(s, req{path: "/ui/api/nosuch"}); w.Code != 404 || decode(t, w)["error"] == nil {
		t.Errorf("unknown API: %d %s", w.Code, w.Body)
	}
	if w := do(s, req{method: http.MethodPost, path: "/ui/api/identities", origin: "http://127.0.0.1:15018"}); w.Code != 405 {
		t.Errorf("POST identities: %d", w.Code)
	}
}

func TestDenialsLimit(t *testing.T) {
	s, _ := newServer(t, Config{Replica: "r1", Denials: fakeDenials{}})
	m := decode(t, do(s, req{path: "/ui/api/denials?limit=5"}))
	if m["replica"] != "r1" || m["logging"] != true || m["dropped"] != 4.0 || len(m["denials"].([]any)) != 1 {
		t.Errorf("denials = %v", m)
	}
	for _, bad := range []string{"0", "-1", "x", "1001"} {
		if w := do(s, req{path: "/ui/api/denials?limit=" + bad}); w.Code != 400 {
			t.Errorf("limit=%s: %d", bad, w.Code)
		}
	}
}

func TestStatic(t *testing.T) {
	s, _ := newServer(t, Config{})
	if w := do(s, req{path: "/"}); w.Code != http.StatusFound || w.Header().Get("Location") != Prefix {
		t.Errorf("/: %d %v", w.Code, w.Header())
	}
	if w := do(s, req{path: "/ui/"}); w.Code != 200 || !strings.Contains(w.Header().Get("Content-Type"), "text/html") {
		t.Errorf("/ui/: %d %s", w.Code, w.Header().Get("Content-Type"))
	}
	for _, p := range []string{"/ui/static/", "/ui/static/../ui.go", "/ui/static/nosuch.js", "/ui/static/index.html"} {
		if w := do(s, req{path: p}); w.Code != 404 {
			t.Errorf("%s: %d", p, w.Code)
		}
	}
}

// TestStatusMapping pins the documented mapping from the rotation audit.
func TestStatusMapping(t *testing.T) {
	for _, tt := range []struct {
		a    audit.Identity
		want string
	}{
		{audit.Identity{Status: "ok"}, StatusOnTime},
		{audit.Identity{Status: "due"}, StatusOnTime},
		{audit.Identity{Status: "overdue"}, StatusLate},
		{audit.Identity{Status: "ok", LateRenewals: 1, LastRenewal: audit.RenewalLate}, StatusLate},
		{audit.Identity{Status: "ok", Lapses: 1, LateRenewals: 1, LastRenewal: audit.RenewalLapsed}, StatusLapsed},
		// The status follows the latest renewal: old lapses and late
		// renewals stay in their counts only.
		{audit.Identity{Status: "ok", Renewals: 100, Lapses: 1, LastRenewal: audit.RenewalOnTime}, StatusOnTime},
		{audit.Identity{Status: "due", Renewals: 9, LateRenewals: 3, LastRenewal: audit.RenewalOnTime}, StatusOnTime},
		{audit.Identity{Status: "ok", Lapses: 1, LastRenewal: audit.RenewalLate}, StatusLate},
		{audit.Identity{Status: "expired", Lapses: 1}, StatusStoppedRenewing},
		{audit.Identity{Status: "revoked", Lapses: 1}, StatusRevoked},
	} {
		got := IdentityFromAudit(tt.a, t0)
		if got.Status != tt.want || got.StatusLabel == "" {
			t.Errorf("%+v -> %q (%q), want %q", tt.a, got.Status, got.StatusLabel, tt.want)
		}
	}
}
