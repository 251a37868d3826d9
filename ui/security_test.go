package ui

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"
)

// svidCert makes a certificate whose URI SAN is id ("" for none).
func svidCert(t *testing.T, id string) *x509.Certificate {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), NotBefore: t0.Add(-time.Hour), NotAfter: t0.Add(time.Hour)}
	if id != "" {
		u, err := url.Parse(id)
		if err != nil {
			t.Fatal(err)
		}
		tmpl.URIs = []*url.URL{u}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	c, err := x509.ParseCertificate(der)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// withCert is a GET over TLS from a client that presented cert, verified
// (the listener's TLS verifies the chain; the page checks the ID).
func withCert(path string, cert *x509.Certificate) *http.Request {
	r := httptest.NewRequest(http.MethodGet, "https://localhost:15018"+path, nil)
	r.Host = "localhost:15018"
	r.TLS = &tls.ConnectionState{PeerCertificates: []*x509.Certificate{cert}, VerifiedChains: [][]*x509.Certificate{{cert}}}
	return r
}

func serve(s http.Handler, r *http.Request) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	s.ServeHTTP(w, r)
	return w
}

// TestClientCertNeedsAllowedID: a certificate from the client CA is not
// enough; its SPIFFE ID must be one of ClientIDs (sec F1: with the mesh's
// bundle as the CA, every workload has one).
func TestClientCertNeedsAllowedID(t *testing.T) {
	if _, err := New(Config{Addr: "0.0.0.0:15018", ClientCerts: true}); !errors.Is(err, ErrNoClientIDs) {
		t.Errorf("client certificates without IDs: %v, want ErrNoClientIDs", err)
	}
	if _, err := New(Config{Addr: "0.0.0.0:15018", ClientCerts: true, ClientIDs: []string{"not-an-id"}}); err == nil {
		t.Error("a client ID that is no SPIFFE ID was accepted")
	}
	const admin = "spiffe://cluster.local/ns/ops/sa/ui-admin"
	s, _ := newServer(t, Config{Addr: "0.0.0.0:15018", ClientCerts: true, ClientIDs: []string{admin}})
	if w := serve(s, withCert("/ui/api/identities", svidCert(t, admin))); w.Code != 200 {
		t.Errorf("the allowed ID: %d %s", w.Code, w.Body)
	}
	for _, id := range []string{"spiffe://cluster.local/ns/default/sa/random-workload", admin + "/x", "spiffe://other.example/ns/ops/sa/ui-admin", ""} {
		w := serve(s, withCert("/ui/api/identities", svidCert(t, id)))
		if w.Code != http.StatusForbidden || strings.Contains(w.Body.String(), "identities\"") {
			t.Errorf("certificate of %q: %d %s, want 403", id, w.Code, w.Body)
		}
	}
}

func bearerFrom(path, remote, tok string) *http.Request {
	r := httptest.NewRequest(http.MethodGet, path, nil)
	r.Host = "localhost:15018"
	r.RemoteAddr = remote
	r.Header.Set("Authorization", "Bearer "+tok)
	return r
}

func loginFrom(remote, tok string) *http.Request {
	r := httptest.NewRequest(http.MethodPost, LoginPath, strings.NewReader(url.Values{"token": {tok}}.Encode()))
	r.Host = "localhost:15018"
	r.RemoteAddr = remote
	r.Header.Set("Origin", "http://localhost:15018")
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	return r
}

// TestTokenGuessingThrottled: wrong tokens, by bearer header or login
// form alike, draw on one bucket per client address: failBurst of them,
// then one per second; a right token costs nothing, and other addresses
// are not locked out (sec F3).
func TestTokenGuessingThrottled(t *testing.T) {
	var logs bytes.Buffer
	s, clk := newServer(t, Config{Addr: "0.0.0.0:15018", Token: token, Log: slog.New(slog.NewTextHandler(&logs, nil))})
	const attacker, operator = "192.0.2.7:5555", "198.51.100.1:4444"
	// Right tokens give their attempt back: they never run the bucket dry.
	for range 2 * failBurst {
		if w := serve(s, bearerFrom("/ui/api/session", attacker, token)); w.Code != 200 {
			t.Fatalf("the right token: %d", w.Code)
		}
	}
	for i := range failBurst {
		req := bearerFrom("/ui/api/session", attacker, "wrong-token-0123456789")
		if i%2 == 1 {
			req = loginFrom(attacker, "wrong-token-0123456789")
		}
		if w := serve(s, req); w.Code != 401 {
			t.Fatalf("wrong token %d: %d, want 401", i, w.Code)
		}
	}
	for _, r := range []*http.Request{
		bearerFrom("/ui/api/session", attacker, "wrong-token-0123456789"),
		bearerFrom("/ui/api/identities", attacker, token),
		loginFrom(attacker, token),
	} {
		w := serve(s, r)
		if w.Code != http.StatusTooManyRequests || w.Header().Get("Retry-After") != "1" {
			t.Errorf("%s %s after %d wrong tokens: %d Retry-After %q, want 429 and 1", r.Method, r.URL.Path, failBurst, w.Code, w.Header().Get("Retry-After"))
		}
	}
	// Another address is not locked out.
	if w := serve(s, bearerFrom("/ui/api/session", operator, token)); w.Code != 200 {
		t.Errorf("another address with the right token: %d", w.Code)
	}
	if w := serve(s, loginFrom(operator, token)); w.Code != http.StatusSeeOther {
		t.Errorf("another address logging in: %d", w.Code)
	}
	// A second later, one more attempt.
	clk.SetTime(t0.Add(time.Second))
	if w := serve(s, bearerFrom("/ui/api/session", attacker, "wrong-token-0123456789")); w.Code != 401 {
		t.Errorf("a second later: %d, want 401", w.Code)
	}
	if w := serve(s, bearerFrom("/ui/api/session", attacker, token)); w.Code != 429 {
		t.Errorf("right after: %d, want 429", w.Code)
	}
	// Refusals are logged at Warn, at most one line per failLogEvery.
	if n := strings.Count(logs.String(), "level=WARN msg=\"web UI: refused a token attempt"); n != 1 {
		t.Errorf("%d refusal lines, want 1:\n%s", n, logs.String())
	}
	clk.SetTime(t0.Add(failLogEvery + time.Second))
	for range failBurst + 3 {
		serve(s, bearerFrom("/ui/api/session", attacker, "wrong-token-0123456789"))
	}
	if n := strings.Count(logs.String(), "refused a token attempt"); n != 2 || !strings.Contains(logs.String(), "refused_not_logged=") {
		t.Errorf("%d refusal lines after %v, want 2:\n%s", n, failLogEvery, logs.String())
	}
}

// TestParallelGuessesCheckAtMostTheBurst: the check and the stamp are one
// step, so 50 wrong logins at once compare at most failBurst tokens.
func TestParallelGuessesCheckAtMostTheBurst(t *testing.T) {
	s, _ := newServer(t, Config{Addr: "0.0.0.0:15018", Token: token})
	var wg sync.WaitGroup
	codes := make(chan int, 50)
	for range 50 {
		wg.Go(func() { codes <- serve(s, loginFrom("192.0.2.9:1", "wrong-token-0123456789")).Code })
	}
	wg.Wait()
	close(codes)
	n := map[int]int{}
	for c := range codes {
		n[c]++
	}
	if n[401] != failBurst || n[429] != 50-failBurst {
		t.Errorf("50 parallel wrong logins: %v, want %d checked (401) and the rest 429", n, failBurst)
	}
}

// TestFailLimiterBounded: the addresses remembered are bounded.
func TestFailLimiterBounded(t *testing.T) {
	l := newFailLimiter(slog.New(slog.DiscardHandler))
	for i := range maxFailIPs + 100 {
		l.take(fmt.Sprintf("10.0.%d.%d", i/256, i%256), t0, "bearer")
	}
	if len(l.by) > maxFailIPs {
		t.Errorf("%d addresses remembered, want at most %d", len(l.by), maxFailIPs)
	}
}

// TestWeakTokensRefused: a token needs MinTokenLength characters, of
// MinTokenDistinct different ones (sec F5).
func TestWeakTokensRefused(t *testing.T) {
	for _, tok := range []string{"short", "aaaaaaaaaaaaaaaa", "abababababababababab", "abcdefgabcdefgabcdefg", "0123456789abcdef ghij"} {
		if err := CheckToken(tok); err == nil {
			t.Errorf("token %q accepted", tok)
		}
		if _, err := New(Config{Addr: "0.0.0.0:1", Token: tok}); err == nil {
			t.Errorf("New accepted token %q", tok)
		}
	}
	for _, tok := range []string{token, "abcdefghabcdefgh"} {
		if err := CheckToken(tok); err != nil {
			t.Errorf("token %q: %v", tok, err)
		}
	}
}

// TestSessionCookieSecureOverTLS: over TLS the cookie is Secure.
func TestSessionCookieSecureOverTLS(t *testing.T) {
	s, _ := newServer(t, Config{Addr: "0.0.0.0:15018", Token: token})
	r := loginFrom("192.0.2.1:1", token)
	r.TLS = &tls.ConnectionState{}
	r.Header.Set("Origin", "https://localhost:15018")
	w := serve(s, r)
	cs := w.Result().Cookies()
	if w.Code != http.StatusSeeOther || len(cs) != 1 || !cs[0].Secure {
		t.Errorf("login over TLS: %d, cookies %+v, want one Secure cookie", w.Code, cs)
	}
}
