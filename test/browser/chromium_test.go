package browser

import (
	"context"
	"encoding/json"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"
)

// views are the page's views, in the order of its navigation.
var views = []string{"identities", "ca", "access", "denials", "journal"}

// tab is one browser tab in a Chromium of its own, with every request the
// page made recorded.
type tab struct {
	t   *testing.T
	ctx context.Context

	mu       sync.Mutex
	requests []string // URLs, in order
	errors   []string // uncaught exceptions of the page
}

// newTab starts a headless Chromium with a fresh profile for the test and
// opens a tab; both end with the test.
func newTab(t *testing.T) *tab {
	t.Helper()
	profile := t.TempDir()
	alloc, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chromium),
		chromedp.Headless,
		// Root in CI: Chromium's sandbox needs a user namespace root may
		// not have.
		chromedp.NoSandbox,
		chromedp.DisableGPU,
		chromedp.NoFirstRun,
		chromedp.NoDefaultBrowserCheck,
		chromedp.UserDataDir(profile),
		chromedp.WindowSize(1280, 900),
		chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true),
		chromedp.Flag("disable-sync", true),
		chromedp.Flag("disable-quic", true),
		chromedp.Flag("disable-default-apps", true),
		chromedp.Flag("disable-extensions", true),
		chromedp.Flag("disable-dev-shm-usage", true),
		chromedp.Flag("disable-features", "Translate,OptimizationHints,MediaRouter"),
		chromedp.Flag("metrics-recording-only", true),
		chromedp.Flag("safebrowsing-disable-auto-update", true),
		chromedp.Flag("password-store", "basic"),
		chromedp.Flag("use-mock-keychain", true),
	)
	tb := &tab{t: t}
	ctx, cancelTab := chromedp.NewContext(alloc,
		chromedp.WithListener(tb.listen),
		chromedp.WithLogf(t.Logf))
	t.Cleanup(func() { cancelTab(); cancelAlloc() })
	// The first Run starts the browser, under the tab's own context.
	if err := chromedp.Do(ctx); err != nil {
		t.Fatalf("starting Chromium %s: %v", chromium, err)
	}
	tb.ctx = ctx
	return tb
}

func (tb *tab) listen(ev any) {
	switch ev := ev.(type) {
	case *network.EventRequestWillBeSent:
		tb.mu.Lock()
		tb.requests = append(tb.requests, ev.Request.URL)
		tb.mu.Unlock()
	case *runtime.EventExceptionThrown:
		tb.mu.Lock()
		d := ev.ExceptionDetails
		msg := d.Text
		if d.Exception != nil && d.Exception.Description != "" {
			msg += " " + d.Exception.Description
		}
		tb.errors = append(tb.errors, fmt.Sprintf("%s:%d: %s", d.URL, d.LineNumber+1, msg))
		tb.mu.Unlock()
	}
}

// requestsSeen returns the URLs requested so far.
func (tb *tab) requestsSeen() []string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return append([]string(nil), tb.requests...)
}

// pageErrors returns the page's uncaught exceptions so far.
func (tb *tab) pageErrors() []string {
	tb.mu.Lock()
	defer tb.mu.Unlock()
	return append([]string(nil), tb.errors...)
}

// do runs actions with a time limit.
func (tb *tab) do(d time.Duration, actions ...chromedp.Action[chromedp.Void]) error {
	ctx, cancel := context.WithTimeout(tb.ctx, d)
	defer cancel()
	return chromedp.Do(ctx, actions...)
}

// eval evaluates a JavaScript expression into v's type.
func eval[T any](tb *tab, expr string) T {
	tb.t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, 30*time.Second)
	defer cancel()
	v, err := chromedp.Run(ctx, chromedp.Evaluate[T](expr))
	if err != nil {
		tb.t.Fatalf("evaluating %s: %v", expr, err)
	}
	return v
}

// navigate loads the page at u.
func (tb *tab) navigate(u string) {
	tb.t.Helper()
	if err := tb.do(30*time.Second, chromedp.Navigate(u)); err != nil {
		tb.t.Fatalf("loading %s: %v", u, err)
	}
}

// waitFor polls a JavaScript predicate until it is true, failing the test
// with what after d.
func (tb *tab) waitFor(d time.Duration, predicate, what string) {
	tb.t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, d+5*time.Second)
	defer cancel()
	_, err := chromedp.Run(ctx, chromedp.Poll[chromedp.Void](predicate,
		chromedp.WithPollingInterval(100*time.Millisecond), chromedp.WithPollingTimeout(d)))
	if err != nil {
		tb.t.Fatalf("%s: not within %s (%v); page errors: %q", what, d, err, tb.pageErrors())
	}
}

// jsString quotes s as a JavaScript string literal.
func jsString(s string) string {
	b, _ := json.Marshal(s)
	return string(b)
}

// shownJS is true when section #view is displayed and has rendered its
// data.
func shownJS(view string) string {
	sel := jsString("section#" + view)
	return fmt.Sprintf(`(() => { const s = document.querySelector(%s);
		return !!s && s.dataset.loaded === "true" && !s.hidden && s.getClientRects().length > 0 &&
			getComputedStyle(s).display !== "none" && getComputedStyle(s).visibility !== "hidden"; })()`, sel)
}

// waitView waits until the view is the one shown and has its data.
func (tb *tab) waitView(view string) {
	tb.t.Helper()
	tb.waitFor(30*time.Second, shownJS(view), "view "+view+" shown with data-loaded=true")
}

// onlyViewShown fails unless view is the only section of the views shown.
func (tb *tab) onlyViewShown(view string) {
	tb.t.Helper()
	for _, v := range views {
		shown := eval[bool](tb, fmt.Sprintf(`(() => { const s = document.querySelector(%s);
			return !!s && !s.hidden && s.getClientRects().length > 0; })()`, jsString("section#"+v)))
		if shown != (v == view) {
			tb.t.Errorf("with view %s chosen, section#%s shown = %v", view, v, shown)
		}
	}
}

var (
	shotsOnce sync.Once
	shotsDir  string
	shotsErr  error
)

// screenshot saves a full-page PNG of the tab as NAME.png in
// TRUSTMESH_SCREENSHOTS, or in a temporary directory that is kept.
func (tb *tab) screenshot(name string) {
	tb.t.Helper()
	shotsOnce.Do(func() {
		if shotsDir = os.Getenv("TRUSTMESH_SCREENSHOTS"); shotsDir != "" {
			shotsErr = os.MkdirAll(shotsDir, 0o755)
			return
		}
		shotsDir, shotsErr = os.MkdirTemp("", "trustmesh-screenshots-")
	})
	if shotsErr != nil {
		tb.t.Fatal(shotsErr)
	}
	ctx, cancel := context.WithTimeout(tb.ctx, 30*time.Second)
	defer cancel()
	// From the top, as a user first sees the view: a sticky header drawn
	// at a scroll offset would cover its heading.
	if _, err := chromedp.Run(ctx, chromedp.Evaluate[chromedp.Void](`window.scrollTo(0, 0)`)); err != nil {
		tb.t.Fatal(err)
	}
	png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
	if err != nil {
		tb.t.Fatalf("screenshot %s: %v", name, err)
	}
	path := filepath.Join(shotsDir, name+".png")
	if err := os.WriteFile(path, png, 0o644); err != nil {
		tb.t.Fatal(err)
	}
	tb.t.Logf("screenshot: %s", path)
}

// axeViolation is the part of an axe-core result the tests report.
type axeViolation struct {
	ID    string `json:"id"`
	Help  string `json:"help"`
	Nodes []struct {
		Target  []any  `json:"target"`
		Summary string `json:"failureSummary"`
	} `json:"nodes"`
}

// axeTags are the rules axe-core runs: WCAG 2.0 and 2.1, levels A and AA.
var axeTags = []string{"wcag2a", "wcag2aa", "wcag21a", "wcag21aa"}

// axe runs axe-core's WCAG A and AA rules on the page as it is and returns
// the violations.
func (tb *tab) axe() []axeViolation {
	tb.t.Helper()
	ctx, cancel := context.WithTimeout(tb.ctx, 60*time.Second)
	defer cancel()
	loaded, err := chromedp.Run(ctx, chromedp.Evaluate[bool](`typeof axe !== "undefined"`))
	if err == nil && !loaded {
		// As a DevTools script, which the page's Content-Security-Policy
		// does not govern.
		_, err = chromedp.Run(ctx, chromedp.Evaluate[chromedp.Void](axeSource))
	}
	if err != nil {
		tb.t.Fatalf("injecting axe-core: %v", err)
	}
	tags, _ := json.Marshal(axeTags)
	res, err := chromedp.Run(ctx, chromedp.Evaluate[[]axeViolation](
		`axe.run(document, {runOnly: {type: "tag", values: `+string(tags)+`}, resultTypes: ["violations"]}).then(r => r.violations)`,
		chromedp.EvalAwaitPromise))
	if err != nil {
		tb.t.Fatalf("running axe-core: %v", err)
	}
	return res
}

// offHost returns the requests that went anywhere but the UI's host:port
// (data: and blob: URLs are the page's own bytes, not requests).
func offHost(requests []string, uiHost string) []string {
	var off []string
	for _, r := range requests {
		u, err := url.Parse(r)
		if err != nil {
			off = append(off, r)
			continue
		}
		switch u.Scheme {
		case "data", "blob":
			continue
		case "http", "https", "ws", "wss":
			if u.Host == uiHost {
				continue
			}
		}
		off = append(off, r)
	}
	return off
}

// focusedJS describes the focused element, for failure messages.
const focusedJS = `(() => { const e = document.activeElement; if (!e) return "nothing";
	return e.tagName.toLowerCase() + (e.id ? "#" + e.id : "") + (e.getAttribute("href") ? "[href=" + e.getAttribute("href") + "]" : "") +
		" " + JSON.stringify((e.textContent || "").trim().slice(0, 40)); })()`

// tabTo presses Tab until the focused element matches selector, at most
// max times.
func (tb *tab) tabTo(selector string, max int) bool {
	tb.t.Helper()
	match := fmt.Sprintf(`!!document.activeElement && document.activeElement.matches(%s)`, jsString(selector))
	for range max {
		if eval[bool](tb, match) {
			return true
		}
		if err := tb.do(10*time.Second, chromedp.KeyEvent("\t")); err != nil {
			tb.t.Fatalf("pressing Tab: %v", err)
		}
	}
	return eval[bool](tb, match)
}

// containsAll reports the strings of want that s lacks.
func missingFrom(s string, want ...string) []string {
	var out []string
	for _, w := range want {
		if !strings.Contains(s, w) {
			out = append(out, w)
		}
	}
	return out
}
