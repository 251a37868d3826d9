package engine_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// TestReview17bUnderCapCost: the policy shapes that cost ext_authz most per
// Check are bounded. 600 path templates of 1000 {*} each, admitted under
// the old count, are refused; the worst the bounds admit, as many path
// templates of one or of MaxTemplateOperators operators as MaxValues
// holds, costs a Check of a request to the selected workload milliseconds.
func TestReview17bUnderCapCost(t *testing.T) {
	doc := func(n, segs int) []byte {
		var b strings.Builder
		b.WriteString("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: big, namespace: foo}\nspec:\n  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        paths:\n")
		for i := range n {
			fmt.Fprintf(&b, "        - /p%d%s\n", i, strings.Repeat("/{*}", segs))
		}
		return []byte(b.String())
	}
	if _, err := policy.ParseYAML("big.yaml", doc(600, 1000), "foo"); err == nil {
		t.Fatal("600 path templates of 1000 {*} parsed, want refused")
	}
	for _, segs := range []int{1, policy.MaxTemplateOperators} {
		n := min((policy.MaxValues-2)/(1+segs), policy.MaxPolicyBytes/len(fmt.Sprintf("/p%d%s", 999, strings.Repeat("/{*}", segs))))
		ps, err := policy.ParseYAML("big.yaml", doc(n, segs), "foo")
		if err != nil {
			t.Fatalf("%d templates of %d operators: %.300v", n, segs, err)
		}
		start := time.Now()
		set, err := engine.Build(context.Background(), engine.SetConfig{Policies: ps})
		if err != nil {
			t.Fatal(err)
		}
		build := time.Since(start)
		path := fmt.Sprintf("/p%d", n-1) + strings.Repeat("/a", segs)
		var worst time.Duration
		// The Checks' CPU time, not the wall clock's: this runs beside
		// other packages' tests on a shared machine, which once stretched
		// a 108 ms wall-clock Check past the bound with no change here.
		for range 3 {
			var d *engine.Decision
			cpu := onThreadCPU(func() {
				d, err = set.Check(context.Background(), fuzzRequest("GET", path, "spiffe://cluster.local/ns/foo/sa/x", "", "web", "foo", false))
			})
			worst = max(worst, cpu)
			if err != nil || d == nil || !d.Allowed {
				t.Errorf("Check of %s: %+v, %v; want allowed by the last template", path, d, err)
			}
		}
		t.Logf("%d templates of %d operators: Build %v, most CPU of 3 Checks %v", n, segs, build, worst)
		if worst > 100*time.Millisecond {
			t.Errorf("%d templates of %d operators: a Check took %v of CPU, want milliseconds", n, segs, worst)
		}
	}
}
