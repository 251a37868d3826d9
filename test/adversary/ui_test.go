package adversary

import (
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"math/big"
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
	// Off loopback over plain HTTP the token crosses the network in
	// clear: refused unless the operator says --ui-insecure-http.
	out, err = exec.Command(bin, "serve", "--validate", "--data-dir", filepath.Join(t.TempDir(), "d"), "--kubernetes", "off",
		"--listen-ca", "127.0.0.1:0", "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "", "--listen-authz", "off",
		"--listen-ui", "0.0.0.0:"+port, "--ui-token-file", tf).CombinedOutput()
	if exitCode(err) != 2 || !strings.Contains(string(out), "--ui-tls-cert") || !strings.Contains(string(out), "--ui-insecure-http") {
		t.Fatalf("serve --listen-ui 0.0.0.0 with a token over plain HTTP: %v\n%s\nwant exit 2 naming --ui-tls-cert and --ui-insecure-http", err, out)
	}
	s := start(t, serveConfig{args: []string{"--listen-ui", "0.0.0.0:" + port, "--ui-token-file", tf, "--ui-insecure-http"}})
	if !s.logContains("plain HTTP off loopback") {
		t.Errorf("serve --ui-insecure-http logged no warning:\n%s", s.lastLog())
	}
	addr := "127.0.0.1:" + port
	for i, p := range []string{"/ui/api/session", "/ui/api/identities", "/ui/api/denials", "/ui/api/journal"} {
		wrong := map[string]string{"no token": ""}
		if i < 2 { // fewer than the 5 wrong tokens an address may try at once
			wrong["a wrong token"], wrong["a prefix"] = token+"x", token[:16]
		}
		for name, bearer := range wrong {
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

// exitCode is a finished command's exit status (-1 if it did not run).
func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err == nil {
		return 0
	}
	return -1
}

// validateUI runs serve --validate with a loopback-only configuration and
// the UI flags args.
func validateUI(t *testing.T, args ...string) (int, string) {
	t.Helper()
	out, err := exec.Command(bin, append([]string{"serve", "--validate", "--data-dir", filepath.Join(t.TempDir(), "d"), "--kubernetes", "off",
		"--listen-ca", "127.0.0.1:0", "--listen-monitoring", "127.0.0.1:0", "--listen-bundle", "", "--listen-authz", "off"}, args...)...).CombinedOutput()
	return exitCode(err), string(out)
}

// uiServerCert writes a self-signed certificate for 127.0.0.1 and its key,
// for the UI's HTTPS, and returns their paths and a pool that trusts it.
func uiServerCert(t *testing.T) (certFile, keyFile string, pool *x509.CertPool) {
	t.Helper()
	key := newKey(t)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(7), Subject: pkix.Name{CommonName: "trustmesh-ui"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	certFile, keyFile = filepath.Join(dir, "ui.pem"), filepath.Join(dir, "ui-key.pem")
	if err := os.WriteFile(certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(keyFile, pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb}), 0o600); err != nil {
		t.Fatal(err)
	}
	c, _ := x509.ParseCertificate(der)
	pool = x509.NewCertPool()
	pool.AddCert(c)
	return certFile, keyFile, pool
}

// TestUIClientCertNeedsAnAllowedID: with the mesh's bundle as the UI's
// client CA, every workload of the mesh has a certificate from it; only
// the SPIFFE IDs given with --ui-client-id get in, and serve refuses a
// client CA without them.
func TestUIClientCertNeedsAnAllowedID(t *testing.T) {
	mesh := start(t, serveConfig{})
	const admin = td + "/ns/ops/sa/ui-admin"
	intruder := mesh.enrol(t, td+"/ns/default/sa/random-workload")
	operator := mesh.enrol(t, admin)
	bundle := filepath.Join(t.TempDir(), "bundle.pem")
	b, err := mesh.cli("ca", "bundle", "--data-dir", mesh.dataDir)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bundle, b, 0o600); err != nil {
		t.Fatal(err)
	}
	cert, key, pool := uiServerCert(t)
	tlsFlags := []string{"--listen-ui", "127.0.0.1:0", "--ui-tls-cert", cert, "--ui-tls-key", key, "--ui-client-ca", bundle}
	if code, out := validateUI(t, tlsFlags...); code != 2 || !strings.Contains(out, "--ui-client-id") {
		t.Fatalf("serve --ui-client-ca without --ui-client-id: exit %d\n%s\nwant 2 naming --ui-client-id", code, out)
	}
	if code, out := validateUI(t, append(tlsFlags, "--ui-client-id", "not a spiffe id")...); code != 2 || !strings.Contains(out, "--ui-client-id") {
		t.Fatalf("serve --ui-client-id with a bad ID: exit %d\n%s", code, out)
	}
	s := uiServer(t, append(tlsFlags[2:], "--ui-client-id", admin)...)
	get := func(w *workload) (int, string) {
		cfg := &tls.Config{RootCAs: pool, MinVersion: tls.VersionTLS12}
		if w != nil {
			cfg.Certificates = []tls.Certificate{w.tlsCert()}
		}
		c := &http.Client{Timeout: 30 * time.Second, Transport: &http.Transport{TLSClientConfig: cfg}}
		resp, err := c.Get("https://" + s.ui + "/ui/api/identities")
		if err != nil {
			return 0, err.Error()
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	if code, body := get(intruder); code != http.StatusForbidden || strings.Contains(body, `"identities"`) {
		t.Errorf("a workload SVID of the mesh: %d %s, want 403 and no data", code, body)
	}
	if code, _ := get(nil); code != 0 {
		t.Errorf("no client certificate: %d, want the handshake refused", code)
	}
	if code, body := get(operator); code != 200 || !strings.Contains(body, `"identities"`) {
		t.Errorf("the allowed ID: %d %s", code, body)
	}
}

// TestUITokenGuessingIsThrottled: wrong tokens from one address, by the
// Bearer header or the login form, run out after a few: then even the
// right token waits (429, Retry-After), so guessing is slow.
func TestUITokenGuessingIsThrottled(t *testing.T) {
	token := "adversary-ui-token-0123456789"
	tf := filepath.Join(t.TempDir(), "token")
	if err := os.WriteFile(tf, []byte(token), 0o600); err != nil {
		t.Fatal(err)
	}
	s := uiServer(t, "--ui-token-file", tf)
	self := "http://" + s.ui
	codes := map[int]int{}
	for i := range 40 {
		var resp *http.Response
		if i%2 == 0 {
			resp, _ = uiDo(t, s.ui, uiReq{path: "/ui/api/identities", bearer: fmt.Sprintf("guess-%024d", i)})
		} else {
			resp, _ = uiDo(t, s.ui, uiReq{method: http.MethodPost, path: "/ui/login", origin: self, form: url.Values{"token": {fmt.Sprintf("guess-%024d", i)}}})
		}
		codes[resp.StatusCode]++
		if resp.StatusCode == http.StatusTooManyRequests && resp.Header.Get("Retry-After") == "" {
			t.Error("429 without Retry-After")
		}
	}
	if codes[http.StatusUnauthorized] > 6 || codes[http.StatusTooManyRequests] < 34 {
		t.Errorf("40 quick guesses: %v, want at most a handful checked and the rest 429", codes)
	}
	if resp, _ := uiDo(t, s.ui, uiReq{path: "/ui/api/identities", bearer: token}); resp.StatusCode != http.StatusTooManyRequests {
		t.Errorf("the right token right after: %d, want 429", resp.StatusCode)
	}
	if !s.logContains("refused a token attempt") {
		t.Errorf("no warning about the refused attempts:\n%s", s.lastLog())
	}
	time.Sleep(1100 * time.Millisecond)
	if resp, b := uiDo(t, s.ui, uiReq{path: "/ui/api/identities", bearer: token}); resp.StatusCode != 200 {
		t.Errorf("the right token a second later: %d %s", resp.StatusCode, b)
	}
}

// TestUITokenFileHygiene: serve refuses a token file others can read, and
// a token that is easy to guess.
func TestUITokenFileHygiene(t *testing.T) {
	dir := t.TempDir()
	for name, c := range map[string]struct {
		content string
		mode    os.FileMode
		want    string
	}{
		"world-readable": {"adversary-ui-token-0123456789", 0o644, "chmod 600"},
		"group-readable": {"adversary-ui-token-0123456789", 0o640, "chmod 600"},
		"one letter":     {"aaaaaaaaaaaaaaaaaaaaaaaa", 0o600, "different characters"},
		"two letters":    {"abababababababababababab", 0o600, "different characters"},
	} {
		f := filepath.Join(dir, strings.ReplaceAll(name, " ", "-"))
		if err := os.WriteFile(f, []byte(c.content), c.mode); err != nil {
			t.Fatal(err)
		}
		if err := os.Chmod(f, c.mode); err != nil {
			t.Fatal(err)
		}
		link := f + ".link" // as Kubernetes mounts a Secret
		if err := os.Symlink(f, link); err != nil {
			t.Fatal(err)
		}
		for _, p := range []string{f, link} {
			if code, out := validateUI(t, "--listen-ui", "127.0.0.1:0", "--ui-token-file", p); code != 2 || !strings.Contains(out, c.want) || !strings.Contains(out, "--ui-token-file") {
				t.Errorf("%s token file %s: exit %d\n%s\nwant 2 naming --ui-token-file and %q", name, p, code, out, c.want)
			}
		}
	}
}
