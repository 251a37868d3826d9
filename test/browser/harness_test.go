package browser

import (
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"
)

// The tests of the harness itself: each check the UI tests rely on must
// be able to fail. They serve a page of their own that breaks its rule.

// badPage has an image with no alt text (axe-core's image-alt, WCAG A) and
// loads it from another loopback host, which is off the page's host.
func badPage(offHost string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/":
			w.Header().Set("Content-Type", "text/html; charset=utf-8")
			fmt.Fprintf(w, `<!doctype html><html lang="en"><head><title>bad</title></head>
<body><main><h1>bad</h1><img src="http://%s/pixel.png"></main></body></html>`, offHost)
		default:
			http.NotFound(w, r)
		}
	})
}

func TestHarnessCatchesOffHostRequestsAndViolations(t *testing.T) {
	needTools(t)
	// The "other host": another loopback address, so nothing leaves the
	// machine.
	l, err := net.Listen("tcp", "127.0.0.2:0")
	if err != nil {
		t.Skipf("no second loopback address to stand for another host: %v", err)
	}
	other := httptest.NewUnstartedServer(http.NotFoundHandler())
	other.Listener.Close()
	other.Listener = l
	other.Start()
	defer other.Close()
	srv := httptest.NewServer(badPage(l.Addr().String()))
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "http://")

	tb := newTab(t)
	tb.navigate(srv.URL + "/")
	tb.waitFor(10*time.Second, `document.images.length === 1 && document.images[0].complete`, "the image settled")
	off := offHost(tb.requestsSeen(), host)
	if want := "http://" + l.Addr().String() + "/pixel.png"; !slices.Contains(off, want) {
		t.Errorf("offHost(%q) = %q, want it to hold %s", tb.requestsSeen(), off, want)
	}
	var ids []string
	for _, v := range tb.axe() {
		ids = append(ids, v.ID)
	}
	if !slices.Contains(ids, "image-alt") {
		t.Errorf("axe-core found %q on a page with an image without alt, want image-alt", ids)
	}
}
