package browser

import (
	"fmt"
	"testing"
	"time"
)

// TestIdentitiesTableFitsTheWindow: at a 1280 px window every column of the
// identities table, the last ("Lapses") included, is in view: the table
// does not scroll sideways and the page does not either.
func TestIdentitiesTableFitsTheWindow(t *testing.T) {
	s := shared(t)
	tb := newTab(t)
	tb.navigate(s.uiURL(""))
	tb.waitView("identities")
	tb.waitFor(10*time.Second, fmt.Sprintf(`!!document.querySelector(%s)`,
		jsString(`#identities-table tr[data-spiffe-id="`+ordersID+`"]`)), "a row for "+ordersID)
	type fit struct {
		Window, WrapClient, WrapScroll, PageScroll, LastRight, WrapRight float64
	}
	f := eval[fit](tb, `(() => {
		const t = document.getElementById("identities-table"), w = t.closest(".table-wrap");
		const last = t.querySelector("thead th:last-child").getBoundingClientRect();
		return {Window: window.innerWidth, WrapClient: w.clientWidth, WrapScroll: w.scrollWidth,
			PageScroll: document.documentElement.scrollWidth, LastRight: last.right, WrapRight: w.getBoundingClientRect().right};
	})()`)
	if f.Window > 1280 || f.Window < 1200 {
		t.Fatalf("window is %v px wide, want about 1280", f.Window)
	}
	if f.WrapScroll > f.WrapClient || f.LastRight > f.WrapRight+0.5 || f.PageScroll > f.Window {
		t.Errorf("at %v px the identities table overflows: %+v", f.Window, f)
	}
}
