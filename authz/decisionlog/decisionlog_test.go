package decisionlog

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	testclock "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/authz/engine"
)

func httpReq(path string, headers map[string]string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: "spiffe://td/ns/a/sa/b"},
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://td/ns/c/sa/d"},
		Request:     &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Host: "h", Path: path, Headers: headers}},
	}}
}

func TestRedaction(t *testing.T) {
	l, err := New(Config{Writer: &bytes.Buffer{}, QueryAllowlist: []string{"page"}, HeaderAllowlist: []string{"X-Request-Id"}})
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		path, want string
	}{
		{"/a", "/a"},
		{"/a?token=s3cret&page=2", "/a?token=REDACTED&page=2"},
		{"/a?flag&x=1#frag", "/a?REDACTED&x=REDACTED"},
		{"/a?%70age=3", "/a?%70age=3"},
		// A parameter without a value is itself the secret.
		{"/a?SECRETTOKEN", "/a?REDACTED"},
		{"/a?page&SECRETTOKEN&", "/a?page&REDACTED&"},
		{"/a?=s3cret", "/a?=REDACTED"},
	}
	for _, tt := range tests {
		e := l.Entry(time.Time{}, httpReq(tt.path, map[string]string{"authorization": "Bearer x", "x-request-id": "r1"}), &engine.Decision{})
		if e.Path != tt.want {
			t.Errorf("path %q logged as %q, want %q", tt.path, e.Path, tt.want)
		}
		if e.Headers["authorization"] != Redacted || e.Headers["x-request-id"] != "r1" {
			t.Errorf("headers = %v", e.Headers)
		}
	}
}

// blockingWriter never returns until released, like a stuck disk.
type blockingWriter struct{ release chan struct{} }

func (w blockingWriter) Write(p []byte) (int, error) {
	<-w.release
	return len(p), nil
}

func TestLogNeverBlocks(t *testing.T) {
	w := blockingWriter{release: make(chan struct{})}
	l, err := New(Config{Writer: w, QueueSize: 4})
	if err != nil {
		t.Fatal(err)
	}
	// With no Run draining the queue, the fifth and later entries are
	// dropped, and Log returns at once.
	for range 10 {
		l.Log(httpReq("/", nil), &engine.Decision{})
	}
	if got := l.Dropped(); got != 6 {
		t.Fatalf("dropped %d, want 6", got)
	}
	close(w.release)
}

func TestRunWritesJSONLines(t *testing.T) {
	var buf bytes.Buffer
	clk := testclock.NewFakePassiveClock(time.Date(2026, 5, 6, 7, 8, 9, 0, time.UTC))
	n := 0
	l, err := New(Config{Writer: &buf, Clock: clk, NewID: func() string { n++; return "d" + string(rune('0'+n)) }})
	if err != nil {
		t.Fatal(err)
	}
	rule := 2
	l.Log(httpReq("/x", nil), &engine.Decision{Allowed: true, Reason: engine.ReasonAllowMatched, Policy: "ns/p", Rule: &rule})
	l.Log(httpReq("/y", nil), &engine.Decision{HTTPStatus: 403, Reason: engine.ReasonNoAllowMatched})
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // Run drains what is queued, then returns
	if err := l.Run(ctx); err != nil {
		t.Fatal(err)
	}
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	if len(lines) != 2 {
		t.Fatalf("got %d lines:\n%s", len(lines), buf.String())
	}
	var e1, e2 map[string]any
	if err := json.Unmarshal([]byte(lines[0]), &e1); err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal([]byte(lines[1]), &e2); err != nil {
		t.Fatal(err)
	}
	if e1["decision_id"] != "d1" || e1["time"] != "2026-05-06T07:08:09Z" || e1["policy"] != "ns/p" || e1["rule"] != float64(2) ||
		e1["method"] != "GET" || e1["host"] != "h" || e1["path"] != "/x" ||
		e1["source"].(map[string]any)["principal"] != "spiffe://td/ns/a/sa/b" {
		t.Errorf("line 1 = %s", lines[0])
	}
	if e2["allowed"] != false || e2["reason"] != engine.ReasonNoAllowMatched || e2["http_status"] != float64(403) {
		t.Errorf("line 2 = %s", lines[1])
	}
}

func TestRedactPaths(t *testing.T) {
	tests := []struct {
		name     string
		patterns []string
		path     string
		want     string
		wantErr  string // "" when the decision's error is not checked
	}{
		{"no pattern keeps the path", nil, "/users/alice/orders", "/users/alice/orders", ""},
		{"whole match", []string{`[0-9a-f]{32}`}, "/reset/0123456789abcdef0123456789abcdef/confirm", "/reset/REDACTED/confirm", ""},
		{"groups only", []string{`^/users/([^/]+)/cards/([^/]+)`}, "/users/alice/cards/4111/x", "/users/REDACTED/cards/REDACTED/x", ""},
		{"every match", []string{`tok_[A-Za-z0-9]+`}, "/a/tok_1/b/tok_2", "/a/REDACTED/b/REDACTED", ""},
		{"patterns in turn", []string{`^/users/([^/]+)`, `sess-[0-9]+`}, "/users/bob/sess-42", "/users/REDACTED/REDACTED", ""},
		{"query redacted apart", []string{`^/users/([^/]+)`}, "/users/bob?page=2&SECRET", "/users/REDACTED?page=2&REDACTED", ""},
		{"path only, not the query", []string{`^/users/([^/]+)`}, "/x?/users/bob", "/x?REDACTED", ""},
		{"the error that quotes the path", []string{`users/([^/"]+)`}, "users/carol", "users/REDACTED", `pathnorm: path rejected: "users/REDACTED" does not start with '/'`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l, err := New(Config{Writer: &bytes.Buffer{}, QueryAllowlist: []string{"page"}, RedactPaths: tt.patterns})
			if err != nil {
				t.Fatal(err)
			}
			d := &engine.Decision{}
			if tt.wantErr != "" {
				d.Error = `pathnorm: path rejected: "` + tt.path + `" does not start with '/'`
			}
			e := l.Entry(time.Time{}, httpReq(tt.path, nil), d)
			if e.Path != tt.want {
				t.Errorf("path %q logged as %q, want %q", tt.path, e.Path, tt.want)
			}
			if tt.wantErr != "" && e.Error != tt.wantErr {
				t.Errorf("error logged as %q, want %q", e.Error, tt.wantErr)
			}
		})
	}
}

func TestRedactPathsRefusesBadPatterns(t *testing.T) {
	for _, p := range []string{`(`, `a**`, ``, `x*`} {
		if _, err := New(Config{Writer: &bytes.Buffer{}, RedactPaths: []string{`ok`, p}}); !errors.Is(err, ErrBadPattern) {
			t.Errorf("pattern %q: New = %v, want ErrBadPattern", p, err)
		}
	}
}

// TestEntryNamesThePolicyVersion: every entry names the policy snapshot
// that decided, so that a decision can be matched with the RBAC that the
// xDS server pushed from the same snapshot.
func TestEntryNamesThePolicyVersion(t *testing.T) {
	l, err := New(Config{Writer: &bytes.Buffer{}})
	if err != nil {
		t.Fatal(err)
	}
	e := l.Entry(time.Time{}, httpReq("/a", nil), &engine.Decision{PolicyVersion: 7, PolicyDigest: "sha256:ab"})
	b, err := json.Marshal(e)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(b), `"policy_version":7`) || !strings.Contains(string(b), `"policy_digest":"sha256:ab"`) {
		t.Fatalf("entry %s does not name the policy version", b)
	}
}
