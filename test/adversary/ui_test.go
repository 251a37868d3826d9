package adversary

import (
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// The web UI's attacks: a page on another origin (DNS rebinding, CSRF), a
// flood of the expensive "verify now", and a UI reachable off loopback.

// uiServer starts a serve with its web UI on a loopback port, and args.
func uiServer(t *testing.T, args ...string) *server {
	t.Helper()
	s := start(t, serveConfig{args: append([]string{"--listen-ui", "127.0.0.1:0"}, args...)})
	if s.ui == "" {
		t.Fatalf("serve did not log its web UI's address:\n%s", s.lastLog())
	}
	return s
}

type uiReq struct {
	method, path, host, origin, csrf, bearer string
	cookie                                   *http.Cookie
	form                                     url.Values
}

// uiDo sends r to the UI at addr without following redirects.
func uiDo(t *testing.T, addr string, r uiReq) (*http.Response, []byte) {
	t.Helper()
	if r.method == "" {
		r.method = http.MethodGet
	}
	var body io.Reader
	if r.form != nil {
		body = strings.NewReader(r.form.Encode())
	}
	req, err := http.NewRequest(r.method, "http://"+addr+r.path, body)
	if err != nil {
		t.Fatal(err)
	}
	if r.host != "" {
		req.Host = r.host
	}
	if r.origin != "" {
		req.Header.Set("Origin", r.origin)
	}
	if r.csrf != "" {
		req.Header.Set("X-Trustmesh-CSRF", r.csrf)
	}
	if r.bearer != "" {
		req.Header.Set("Authorization", "Bearer "+r.bearer)
	}
	if r.cookie != nil {
		req.AddCookie(r.cookie)
	}
	if r.form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	c := &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := c.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, b
}

func csrfToken(t *testing.T, addr string, r uiReq) string {
	t.Helper()
	r.path = "/ui/api/session"
	resp, b := uiDo(t, addr, r)
	var s struct {
		CSRF string `json:"csrf_token"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(b, &s) != nil || s.CSRF == "" {
		t.Fatalf("session: %d %s", resp.StatusCode, b)
	}
	return s.CSRF
}

// TestUIRefusesARebindingHost: a page on evil.example whose name now
// resolves to 127.0.0.1 sends its own name as Host. The UI answers 421 and
// nothing else: no data, no CSRF token.
func TestUIRefusesARebindingHost(t *testing.T) {
	s := uiServer(t)
	_, port, _ := net.SplitHostPort(s.ui)
	for _, p := range []string{"/ui/", "/ui/api/session", "/ui/api/identities", "/ui/api/journal"} {
		resp, b := uiDo(t, s.ui, uiReq{path: p, host: "evil.example:" + port})
		if resp.StatusCode != http.StatusMisdirectedRequest || strings.Contains(string(b), "csrf_token") || strings.Contains(string(b), "spiffe://") {
			t.Errorf("GET %s with a rebinding Host: %d %s, want 421 and no data", p, resp.StatusCode, b)
		}
	}
	if resp, _ := uiDo(t, s.ui, uiReq{path: "/ui/api/session", host: "localhost:" + port}); resp.StatusCode != 200 {
		t.Errorf("the listener's own name: %d", resp.StatusCode)
	}
}

// TestUIVerifyRefusesCrossSiteRequests: "verify now" from another origin,
// without the CSRF token or with a wrong one is refused (403); a read from
// another origin gets no CORS grant.
func TestUIVerifyRefusesCrossSiteRequests(t *testing.T) {
	s := uiServer(t)
	self := "http://" + s.ui
	tok := csrfToken(t, s.ui, uiReq{})
	for name, r := range map[string]uiReq{
		"foreign origin with the token": {origin: "http://evil.example", csrf: tok},
		"null origin with the token":    {origin: "null", csrf: tok},
		"no origin with the token":      {csrf: tok},
		"no token":                      {origin: self},
		"a wrong token":                 {origin: self, csrf: strings.Repeat("A", len(tok))},
	} {
		r.method, r.path = http.MethodPost, "/ui/api/journal/verify"
		if resp, b := uiDo(t, s.ui, r); resp.StatusCode != http.StatusForbidden {
			t.Errorf("%s: %d %s, want 403", name, resp.StatusCode, b)
		}
	}
	resp, _ := uiDo(t, s.ui, uiReq{path: "/ui/api/identities", origin: "http://evil.example"})
	if a := resp.Header.Get("Access-Control-Allow-Origin"); a != "" {
		t.Errorf("a cross-origin read is granted CORS: %q", a)
	}
	for h, want := range map[string]string{"X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer", "Cache-Control": "no-store"} {
		if got := resp.Header.Get(h); got != want {
			t.Errorf("%s = %q, want %q", h, got, want)
		}
	}
	if csp := resp.Header.Get("Content-Security-Policy"); !strings.Contains(csp, "frame-ancestors 'none'") || !strings.Contains(csp, "script-src 'self'") || strings.Contains(csp, "unsafe") {
		t.Errorf("Content-Security-Policy %q", csp)
	}
	// The one request that passes every check runs.
	if resp, b := uiDo(t, s.ui, uiReq{method: http.MethodPost, path: "/ui/api/journal/verify", origin: self, csrf: tok}); resp.StatusCode != 200 || !strings.Contains(string(b), `"ok":true`) {
		t.Errorf("a same-origin verify with the token: %d %s", resp.StatusCode, b)
	}
}

// TestUIVerifyFloodIsRateLimited: verify recomputes the whole journal; a
// flood runs it once and gets 429 with Retry-After for the rest.
func TestUIVerifyFloodIsRateLimited(t *testing.T) {
	s := uiServer(t)
	self := "http://" + s.ui
	tok := csrfToken(t, s.ui, uiReq{})
	ok, limited := 0, 0
	for range 20 {
		resp, b := uiDo(t, s.ui, uiReq{method: http.MethodPost, path: "/ui/api/journal/verify", origin: self, csrf: tok})
		switch resp.StatusCode {
		case 200:
			ok++
		case http.StatusTooManyRequests:
			limited++
			if resp.Header.Get("Retry-After") == "" {
				t.Errorf("429 without Retry-After: %s", b)
			}
		default:
			t.Errorf("verify: %d %s", resp.StatusCode, b)
		}
	}
	if ok != 1 || limited != 19 {
		t.Errorf("20 verifies in a row: %d ran, %d limited; want 1 and 19", ok, limited)
	}
}

// TestUIOffLoopbackNeedsAToken: serve refuses to start a UI reachable off
// loopback without authentication; with a token, nothing answers without
// it, and the login's cookie is HttpOnly and SameSite=Strict.
func TestUIOffLoopbackNeedsAToken(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	_, port, _ := net.SplitHostPort(l.Addr().String())
	l.Close()
	out, err := exec.Command(bin, "serve", "--validate", "--data-dir", filepath.Join(t.TempDir(), "d"), "--kubernetes", "off",
		"--listen-ca", "127.0.0.1:0", "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "", "--listen-authz", "off",
		"--listen-ui", "0.0.0.0:"+port).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "--listen-ui") || !strings.Contains(string(out), "--ui-token-file") {
		t.Fatalf("serve --listen-ui 0.0.0.0 without a token: %v\n%s\nwant a refusal naming --listen-ui and --ui-token-file", err, out)
	}

	token := "adversary-ui-token-0123456789"
	tf := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tf, []byte(token+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	s := start(t, serveConfig{args: []string{"--listen-ui", "0.0.0.0:" + port, "--ui-token-file", tf}})
	addr := "127.0.0.1:" + port
	for _, p := range []string{"/ui/api/session", "/ui/api/identities", "/ui/api/denials", "/ui/api/journal"} {
		for name, bearer := range map[string]string{"no token": "", "a wrong token": token + "x", "a prefix": token[:16]} {
			if resp, b := uiDo(t, addr, uiReq{path: p, bearer: bearer}); resp.StatusCode != http.StatusUnauthorized {
				t.Errorf("GET %s with %s: %d %s, want 401", p, name, resp.StatusCode, b)
			}
		}
		if resp, b := uiDo(t, addr, uiReq{path: p, bearer: token}); resp.StatusCode != 200 {
			t.Errorf("GET %s with the token: %d %s", p, resp.StatusCode, b)
		}
	}
	if resp, _ := uiDo(t, addr, uiReq{path: "/ui/"}); resp.StatusCode != http.StatusSeeOther || resp.Header.Get("Location") != "/ui/login" {
		t.Errorf("the page without a session: %d %s, want a redirect to /ui/login", resp.StatusCode, resp.Header.Get("Location"))
	}
	self := "http://" + addr
	resp, _ := uiDo(t, addr, uiReq{method: http.MethodPost, path: "/ui/login", origin: "http://evil.example", form: url.Values{"token": {token}}})
	if resp.StatusCode != http.StatusForbidden || len(resp.Cookies()) != 0 {
		t.Errorf("a login from another origin: %d, cookies %v", resp.StatusCode, resp.Cookies())
	}
	resp, _ = uiDo(t, addr, uiReq{method: http.MethodPost, path: "/ui/login", origin: self, form: url.Values{"token": {token}}})
	cs := resp.Cookies()
	if resp.StatusCode != http.StatusSeeOther || len(cs) != 1 {
		t.Fatalf("login: %d, cookies %v", resp.StatusCode, cs)
	}
	if c := cs[0]; !c.HttpOnly || c.SameSite != http.SameSiteStrictMode || c.Path != "/ui/" {
		t.Errorf("the session cookie %s: want HttpOnly, SameSite=Strict, Path=/ui/", c.String())
	}
	if resp, b := uiDo(t, addr, uiReq{path: "/ui/api/session", cookie: &http.Cookie{Name: cs[0].Name, Value: cs[0].Value}}); resp.StatusCode != 200 {
		t.Errorf("the session's cookie: %d %s", resp.StatusCode, b)
	}
	_ = s
}

// TestUIStaticStaysInItsDirectory: the asset path cannot climb out of the
// embedded assets.
func TestUIStaticStaysInItsDirectory(t *testing.T) {
	s := uiServer(t)
	for _, p := range []string{"/ui/static/../../../etc/passwd", "/ui/static/%2e%2e/%2e%2e/go.mod", "/ui/static/..%2fui.go", "/ui/static/"} {
		resp, b := uiDo(t, s.ui, uiReq{path: p})
		if resp.StatusCode == 200 {
			t.Errorf("GET %s: 200 %.80s", p, b)
		}
	}
	_ = fmt.Sprint()
}
