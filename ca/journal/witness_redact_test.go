package journal_test

import (
	"bytes"
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// TestWitnessStatusHidesCredentials: a witness URL's userinfo and query
// (where credentials live) appear neither in its status, which the web UI
// shows, nor in its error text or its log line; the export still sends
// them.
func TestWitnessStatusHidesCredentials(t *testing.T) {
	var gotUser, gotKey string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotUser, _, _ = r.BasicAuth()
		gotKey = r.URL.Query().Get("api_key")
		w.WriteHeader(http.StatusInternalServerError)
	}))
	defer srv.Close()
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := closed.URL
	closed.Close()
	for _, base := range []string{srv.URL, closedURL} {
		target := strings.Replace(base, "http://", "http://witness-user:S3cretPassw0rd@", 1) + "/ckpt?api_key=TOPSECRET#frag"
		var logs bytes.Buffer
		w := journal.NewExportWitness(target, slog.New(slog.NewTextHandler(&logs, nil)))
		w.Offer([]byte("trustmesh.journal/td\n8\nAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n\n— trustmesh.journal/td AAAA\n"))
		ctx, cancel := context.WithCancel(context.Background())
		done := make(chan error, 1)
		go func() { done <- w.Run(ctx) }()
		deadline := time.Now().Add(10 * time.Second)
		for w.Status().LastError == "" && time.Now().Before(deadline) {
			time.Sleep(10 * time.Millisecond)
		}
		cancel()
		<-done
		st := w.Status()
		if st.LastError == "" {
			t.Fatalf("%s: the export did not fail", base)
		}
		if want := base + "/ckpt"; st.Target != want {
			t.Errorf("target = %q, want %q", st.Target, want)
		}
		for what, text := range map[string]string{"target": st.Target, "error": st.LastError, "log": logs.String()} {
			for _, secret := range []string{"witness-user", "S3cretPassw0rd", "TOPSECRET", "api_key", "frag"} {
				if strings.Contains(text, secret) {
					t.Errorf("%s: the witness's %s shows %q: %s", base, what, secret, text)
				}
			}
		}
	}
	if gotUser != "witness-user" || gotKey != "TOPSECRET" {
		t.Errorf("the witness received user %q and api_key %q: the export must still send the credentials", gotUser, gotKey)
	}
}

func TestRedactTarget(t *testing.T) {
	for in, want := range map[string]string{
		"https://u:p@w.example:8443/a/b?k=v#f": "https://w.example:8443/a/b",
		"https://w.example/ckpt":               "https://w.example/ckpt",
		"/var/lib/witness/checkpoint":          "/var/lib/witness/checkpoint",
		"http://%zz":                           "(a witness URL that does not parse)",
		"HTTPS://u:p@w.example/c?api_key=k":    "https://w.example/c",
	} {
		if got := journal.RedactTarget(in); got != want {
			t.Errorf("RedactTarget(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestCheckTarget: an http(s) URL in any case is a URL, a path is a file,
// and a URL of another scheme is refused rather than taken for a file
// path (and shown unredacted), naming only its scheme.
func TestCheckTarget(t *testing.T) {
	for target, wantURL := range map[string]bool{
		"https://w.example/c": true, "HTTP://w.example/c": true, "Https://w": true,
		"/var/lib/witness/checkpoint": false, "./a://b": false, "witness": false,
	} {
		if got := journal.IsURL(target); got != wantURL {
			t.Errorf("IsURL(%q) = %v, want %v", target, got, wantURL)
		}
		if err := journal.CheckTarget(target); err != nil {
			t.Errorf("CheckTarget(%q): %v", target, err)
		}
	}
	for _, target := range []string{"ftp://u:s3cret@w.example/c", "s3://bucket/c", "file:///w"} {
		err := journal.CheckTarget(target)
		if err == nil {
			t.Errorf("CheckTarget(%q) accepted it", target)
		} else if strings.Contains(err.Error(), "s3cret") || strings.Contains(err.Error(), "bucket") {
			t.Errorf("CheckTarget(%q) = %v: it shows the target", target, err)
		}
	}
}
