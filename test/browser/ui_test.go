package browser

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/chromedp/cdproto/cdp"
	"github.com/chromedp/cdproto/page"
	"github.com/chromedp/chromedp"
	"google.golang.org/grpc/codes"
)

func marker() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return "m" + hex.EncodeToString(b)
}

// deny sends a Check from orders to orders that the policy denies (only
// web may call orders) and returns its marker, which is in its path.
func deny(t *testing.T, s *server, path string) string {
	t.Helper()
	m := marker()
	c := check{src: ordersID, srcAddr: ordersAddr, dst: ordersID, dstAddr: ordersAddr, dstLabels: map[string]string{"app": "orders"},
		host: "orders.shop.svc", path: "/denied/" + m + path}
	if got := s.decide(t, c); got != codes.PermissionDenied {
		t.Fatalf("Check orders -> orders %s: %v, want PermissionDenied", c.path, got)
	}
	return m
}

// TestIdentitiesViewListsAgents: the default view lists both enrolled
// agents' identities, and its search narrows the list.
func TestIdentitiesViewListsAgents(t *testing.T) {
	s := shared(t)
	tb := newTab(t)
	tb.navigate(s.uiURL(""))
	tb.waitView("identities")
	tb.onlyViewShown("identities")
	for _, id := range []string{webID, ordersID} {
		tb.waitFor(10*time.Second, fmt.Sprintf(`!!document.querySelector(%s)`,
			jsString(`#identities-table tr[data-spiffe-id="`+id+`"]`)), "a row for "+id+" in #identities-table")
	}
	// The search narrows the rows to those that match, by keystrokes.
	ctx, cancel := context.WithTimeout(tb.ctx, 20*time.Second)
	defer cancel()
	if err := chromedp.Do(ctx, chromedp.SendKeys(chromedp.CSS("#identities-search"), "orders")); err != nil {
		t.Fatalf("typing into #identities-search: %v", err)
	}
	rowShown := func(id string) string {
		return fmt.Sprintf(`(() => { const r = document.querySelector(%s); return !!r && !r.hidden && r.getClientRects().length > 0; })()`,
			jsString(`#identities-table tr[data-spiffe-id="`+id+`"]`))
	}
	tb.waitFor(5*time.Second, "!"+rowShown(webID), "the web row hidden after searching for orders")
	if !eval[bool](tb, rowShown(ordersID)) {
		t.Errorf("searching for orders hid the orders row")
	}
}

// TestDenialAppears: a denied Check shows in the denials view within
// seconds, without a reload, linked to the access view's cell.
func TestDenialAppears(t *testing.T) {
	s := shared(t)
	tb := newTab(t)
	tb.navigate(s.uiURL("denials"))
	tb.waitView("denials")
	start := time.Now()
	m := deny(t, s, "")
	row := `[...document.querySelectorAll("#denials-table tr[data-decision-id]")].find(r => r.textContent.includes(` + jsString(m) + `))`
	// The view refreshes itself every 2 s; 15 s leaves room for a loaded
	// machine.
	tb.waitFor(15*time.Second, "!!"+row, "the denial "+m+" in #denials-table")
	t.Logf("the denial showed in the denials view %s after the Check was sent", time.Since(start).Round(100*time.Millisecond))
	href := eval[string](tb, `(() => { const a = `+row+`.querySelector('a[href^="#access"]'); return a ? decodeURIComponent(a.getAttribute("href")) : ""; })()`)
	if missing := missingFrom(href, "from=shop/orders", "to=shop/orders"); len(missing) > 0 {
		t.Errorf("the denial's link to the access view is %q, lacking %q", href, missing)
	}
}

// TestPolicyEditChangesAccessView: replacing the policy that lets web call
// orders with one that lets nobody flips the access view's cell from
// allowed to denied.
func TestPolicyEditChangesAccessView(t *testing.T) {
	s := shared(t)
	tb := newTab(t)
	cell := `[...document.querySelectorAll('#access-table tr[data-from="shop/web"][data-to="shop/orders"]')]`
	edge := `[...document.querySelectorAll('#access-graph g.edge[data-from="shop/web"][data-to="shop/orders"]')]`
	verdicts := `(` + cell + `.map(r => r.dataset.verdict).join(","))`
	is := func(v string) string {
		return `(` + cell + `.length > 0 && ` + cell + `.every(r => r.dataset.verdict === "` + v + `") &&
			` + edge + `.length > 0 && ` + edge + `.every(g => g.dataset.verdict === "` + v + `"))`
	}
	tb.navigate(s.uiURL("access"))
	tb.waitView("access")
	if !eval[bool](tb, is("allowed")) {
		t.Fatalf("shop/web -> shop/orders is %q in #access-table, want allowed (with its edge in #access-graph); /ui/api/access says %s",
			eval[string](tb, verdicts), s.cellsJSON(t, "shop/web", "shop/orders"))
	}
	t.Cleanup(func() { s.writePolicy(t, "orders.yaml", ordersPolicy(webID)) })
	s.writePolicy(t, "orders.yaml", ordersPolicy(td+"/ns/shop/sa/nobody"))
	edited := time.Now()
	deadline := edited.Add(20 * time.Second)
	for {
		// The view refreshes itself or on a reload; either will do.
		tb.navigate(s.uiURL("access"))
		tb.waitView("access")
		if eval[bool](tb, is("denied")) {
			t.Logf("the access view showed the edit %s after the file was written", time.Since(edited).Round(100*time.Millisecond))
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("20s after the policy edit, shop/web -> shop/orders is %q, want denied; /ui/api/access says %s",
				eval[string](tb, verdicts), s.cellsJSON(t, "shop/web", "shop/orders"))
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// TestNoRequestOffHost: loading the page and showing every view requests
// nothing from any host but the UI's own.
func TestNoRequestOffHost(t *testing.T) {
	s := shared(t)
	tb := newTab(t)
	tb.navigate(s.uiURL(""))
	for _, v := range views {
		if err := tb.do(10*time.Second, chromedp.Evaluate[chromedp.Void](`location.hash = `+jsString("#"+v))); err != nil {
			t.Fatal(err)
		}
		tb.waitView(v)
	}
	// Let late requests (fonts, images, beacons) start.
	time.Sleep(time.Second)
	reqs := tb.requestsSeen()
	t.Logf("the page made %d requests", len(reqs))
	// The recording works: the page and its API calls are in it.
	for _, want := range []string{"/ui/", "/ui/api/identities", "/ui/api/access"} {
		found := false
		for _, r := range reqs {
			if strings.HasPrefix(r, "http://"+s.ui+want) {
				found = true
			}
		}
		if !found {
			t.Errorf("no request for %s recorded; recorded: %q", want, reqs)
		}
	}
	if off := offHost(reqs, s.ui); len(off) > 0 {
		t.Errorf("the page requested from off the host %s: %q", s.ui, off)
	}
}

// TestViewsScreenshotsAndAccessibility: each view, chosen by its link,
// shows alone; its screenshot is saved; and axe-core finds no violation of
// WCAG 2.0/2.1 A and AA in it.
func TestViewsScreenshotsAndAccessibility(t *testing.T) {
	s := shared(t)
	// A denial, so that the denials view has a row to check.
	deny(t, s, "")
	tb := newTab(t)
	tb.navigate(s.uiURL(""))
	for _, v := range views {
		if err := tb.do(10*time.Second, chromedp.Evaluate[chromedp.Void](`location.hash = `+jsString("#"+v))); err != nil {
			t.Fatal(err)
		}
		tb.waitView(v)
		tb.onlyViewShown(v)
		if v == "denials" {
			tb.waitFor(10*time.Second, `!!document.querySelector("#denials-table tr[data-decision-id]")`, "a row in #denials-table")
		}
		tb.screenshot(v)
		for _, viol := range tb.axe() {
			var where []string
			for _, n := range viol.Nodes {
				where = append(where, fmt.Sprintf("%v: %s", n.Target, n.Summary))
			}
			t.Errorf("view %s: axe-core %s (%s):\n  %s", v, viol.ID, viol.Help, strings.Join(where, "\n  "))
		}
	}
	if errs := tb.pageErrors(); len(errs) > 0 {
		t.Errorf("the page threw: %q", errs)
	}
}

// TestKeyboardReachesEveryView: with Tab and Enter only, a user reaches
// each view from the navigation.
func TestKeyboardReachesEveryView(t *testing.T) {
	s := shared(t)
	tb := newTab(t)
	tb.navigate(s.uiURL(""))
	tb.waitView("identities")
	// Each view in turn, and back to the first.
	for _, v := range append(views[1:], views[0]) {
		link := `nav[aria-label="Views"] a[href="#` + v + `"]`
		if !tb.tabTo(link, 80) {
			t.Fatalf("80 Tabs did not reach %s; focus is on %s", link, eval[string](tb, focusedJS))
		}
		if err := tb.do(10*time.Second, chromedp.KeyEvent("\r")); err != nil {
			t.Fatalf("pressing Enter: %v", err)
		}
		tb.waitView(v)
		tb.onlyViewShown(v)
		if h := eval[string](tb, `location.hash`); !strings.HasPrefix(h, "#"+v) {
			t.Errorf("Enter on the %s link: location.hash %q", v, h)
		}
	}
}

// denialsAPI and accessAPI are the parts of the UI's JSON API that the XSS
// test compares with what the page shows.
type denialsAPI struct {
	Denials []struct {
		DecisionID string `json:"decision_id"`
		Path       string `json:"path"`
	} `json:"denials"`
}

type accessAPI struct {
	Cells []struct {
		From       string   `json:"from"`
		To         string   `json:"to"`
		Verdict    string   `json:"verdict"`
		Conditions []string `json:"conditions"`
	} `json:"cells"`
}

// TestMarkupRendersAsText (attack): markup in a denied request's path and
// in a policy's condition values shows as text and runs nothing. The tab
// ignores the page's Content-Security-Policy, so that only the page's way
// of inserting data stands between the markup and a script.
func TestMarkupRendersAsText(t *testing.T) {
	s := shared(t)
	m := deny(t, s, "/"+strings.Join(xssMarkup, ""))
	tb := newTab(t)
	if err := tb.do(10*time.Second, chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
		_, err := cdp.Call(ctx, tg, page.SetBypassCSP, page.SetBypassCSPParams{Enabled: true})
		return err
	})); err != nil {
		t.Fatalf("bypassing the CSP: %v", err)
	}

	// What the API says, which the page must show as it is. The decision
	// log keeps a denial for the view after the Check has answered, so
	// the API is asked until it has it.
	var path, id string
	for deadline := time.Now().Add(10 * time.Second); path == ""; time.Sleep(50 * time.Millisecond) {
		var den denialsAPI
		if err := s.getJSON("/ui/api/denials", &den); err != nil {
			t.Fatal(err)
		}
		for _, d := range den.Denials {
			if strings.Contains(d.Path, m) {
				path, id = d.Path, d.DecisionID
			}
		}
		if path == "" && time.Now().After(deadline) {
			t.Fatalf("/ui/api/denials lacks the denial %s after 10 s", m)
		}
	}
	if missing := missingFrom(path, xssMarkup...); len(missing) > 0 {
		t.Logf("the decision log's path is %q; it changed %q", path, missing)
	}
	var acc accessAPI
	if err := s.getJSON("/ui/api/access", &acc); err != nil {
		t.Fatal(err)
	}
	var conds []string
	for _, c := range acc.Cells {
		if c.From == "shop/orders" && c.To == "shop/web" {
			if c.Verdict != "conditional" {
				t.Errorf("shop/orders -> shop/web is %q in /ui/api/access, want conditional", c.Verdict)
			}
			conds = append(conds, c.Conditions...)
		}
	}
	if missing := missingFrom(strings.Join(conds, "\n"), xssMarkup...); len(missing) > 0 {
		t.Fatalf("the conditions of shop/orders -> shop/web in /ui/api/access, %q, lack %q", conds, missing)
	}

	tb.navigate(s.uiURL("denials"))
	tb.waitView("denials")
	row := `document.querySelector(` + jsString(`#denials-table tr[data-decision-id="`+id+`"]`) + `)`
	tb.waitFor(10*time.Second, "!!"+row, "the denial "+id+" in #denials-table")
	if text := eval[string](tb, row+`.textContent`); !strings.Contains(text, path) {
		t.Errorf("the denial's row shows %q, not the path %q as text", text, path)
	}
	tb.screenshot("xss-denials")

	if err := tb.do(10*time.Second, chromedp.Evaluate[chromedp.Void](`location.hash = "#access"`)); err != nil {
		t.Fatal(err)
	}
	tb.waitView("access")
	cells := `[...document.querySelectorAll('#access-table tr[data-from="shop/orders"][data-to="shop/web"]')]`
	tb.waitFor(5*time.Second, cells+`.length > 0`, "a row for shop/orders -> shop/web in #access-table")
	text := eval[string](tb, cells+`.map(r => r.textContent).join("\n")`)
	if missing := missingFrom(text, conds...); len(missing) > 0 {
		t.Errorf("the access table's shop/orders -> shop/web rows show %q, lacking the conditions %q as text", text, missing)
	}
	tb.screenshot("xss-access")

	// An image that fails loads asynchronously: give its onerror time.
	time.Sleep(1500 * time.Millisecond)
	if ran := eval[bool](tb, `typeof window.__tmxss !== "undefined"`); ran {
		t.Errorf("the markup ran: window.__tmxss = %v", eval[any](tb, `window.__tmxss`))
	}
	if n := eval[int](tb, `document.querySelectorAll("[onerror], [onload], img[src='x']").length +
		[...document.scripts].filter(s => s.textContent.includes("__tmxss")).length`); n > 0 {
		t.Errorf("the page holds %d elements made from the markup", n)
	}
}

// cellsJSON is what /ui/api/access says of from -> to, for failure
// messages.
func (s *server) cellsJSON(t *testing.T, from, to string) string {
	var acc struct {
		Cells []map[string]any `json:"cells"`
	}
	if err := s.getJSON("/ui/api/access", &acc); err != nil {
		return err.Error()
	}
	var out []map[string]any
	for _, c := range acc.Cells {
		if c["from"] == from && c["to"] == to {
			out = append(out, c)
		}
	}
	b, _ := json.Marshal(out)
	return string(b)
}

// TestVerifyNowByKeyboard: the journal view's "verify now", pressed with
// Enter, runs the verification (a POST with the CSRF token) and shows its
// result.
func TestVerifyNowByKeyboard(t *testing.T) {
	s := shared(t)
	tb := newTab(t)
	tb.navigate(s.uiURL("journal"))
	tb.waitView("journal")
	if !tb.tabTo("#verify-now", 80) {
		t.Fatalf("80 Tabs did not reach #verify-now; focus is on %s", eval[string](tb, focusedJS))
	}
	if err := tb.do(10*time.Second, chromedp.KeyEvent("\r")); err != nil {
		t.Fatalf("pressing Enter: %v", err)
	}
	var j struct {
		LastVerify *struct {
			OK      bool `json:"ok"`
			Checked int  `json:"checked"`
		} `json:"last_verify"`
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		if err := s.getJSON("/ui/api/journal", &j); err != nil {
			t.Fatal(err)
		}
		if j.LastVerify != nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("30s after Enter on #verify-now, /ui/api/journal has no last_verify")
		}
		time.Sleep(200 * time.Millisecond)
	}
	if !j.LastVerify.OK || j.LastVerify.Checked == 0 {
		t.Fatalf("the verification: ok %v, %d entries checked; want ok over the agents' issuance", j.LastVerify.OK, j.LastVerify.Checked)
	}
	tb.waitFor(10*time.Second, `document.querySelector("#verify-result").textContent.includes(`+jsString(fmt.Sprint(j.LastVerify.Checked))+`)`,
		fmt.Sprintf("#verify-result showing the %d entries checked", j.LastVerify.Checked))
	tb.screenshot("journal-verified")
}
