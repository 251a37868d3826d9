package admission_test

import (
	"fmt"
	"strings"
	"testing"
	"time"

	apisecurity "istio.io/api/security/v1beta1"
	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"github.com/trustmesh/trustmesh/admission"
)

// TestReview17bCost: a policy past the bounds whatever its shape (100000
// empty sources, counted as nothing before; 600 path templates of 1000 {*}
// each, under the old count) is refused fast, with one cause naming the
// field (decoding the object is most of the time it takes), and a denial of many refused fields lists at most MaxCauses.
func TestReview17bCost(t *testing.T) {
	tmpl := func(i, segs int) string { return fmt.Sprintf("/p%d", i) + strings.Repeat("/{*}", segs) }
	for _, tc := range []struct {
		name, field string
		rules       func() []*apisecurity.Rule
	}{
		{"100000 empty from", "spec.rules", func() []*apisecurity.Rule {
			fs := make([]*apisecurity.Rule_From, 100000)
			for i := range fs {
				fs[i] = &apisecurity.Rule_From{Source: &apisecurity.Source{}}
			}
			return []*apisecurity.Rule{{From: fs}}
		}},
		{"600 path templates x 1000 {*}", "spec.rules[0].to[0].operation.paths[0]", func() []*apisecurity.Rule {
			var ps []string
			for i := range 600 {
				ps = append(ps, tmpl(i, 1000))
			}
			return []*apisecurity.Rule{{To: []*apisecurity.Rule_To{{Operation: &apisecurity.Operation{Paths: ps}}}}}
		}},
	} {
		p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "t", Name: "big"},
			Spec: apisecurity.AuthorizationPolicy{Rules: tc.rules()}}
		req := apRequest(t, p)
		start := time.Now()
		resp, _ := admission.Review(req, nil)
		took := time.Since(start)
		if resp.Allowed || resp.Result == nil || len(resp.Result.Details.Causes) != 1 || resp.Result.Details.Causes[0].Field != tc.field {
			t.Fatalf("%s: allowed=%v result=%.300v, want one cause for %s", tc.name, resp.Allowed, resp.Result, tc.field)
		}
		if n := len(resp.Result.Message); n > 1000 {
			t.Errorf("%s: a denial of %d bytes, want one short message", tc.name, n)
		}
		t.Logf("%s: %d bytes refused in %v: %s", tc.name, len(req.Object.Raw), took, resp.Result.Message)
	}

	// 200 empty sources, within the bounds, are each refused: the denial
	// names the first MaxCauses and says how many more.
	fs := make([]*apisecurity.Rule_From, 200)
	for i := range fs {
		fs[i] = &apisecurity.Rule_From{Source: &apisecurity.Source{}}
	}
	p := &securityv1.AuthorizationPolicy{ObjectMeta: metav1.ObjectMeta{Namespace: "t", Name: "many"},
		Spec: apisecurity.AuthorizationPolicy{Rules: []*apisecurity.Rule{{From: fs}}}}
	resp, _ := admission.Review(apRequest(t, p), nil)
	more := fmt.Sprintf("and %d more", 200-admission.MaxCauses)
	if resp.Allowed || resp.Result == nil || len(resp.Result.Details.Causes) != admission.MaxCauses+1 ||
		resp.Result.Details.Causes[admission.MaxCauses].Message != more || !strings.HasSuffix(resp.Result.Message, "\n"+more) ||
		strings.Count(resp.Result.Message, "\n") != admission.MaxCauses {
		t.Fatalf("200 refused fields: allowed=%v result=%.500v, want %d causes and %q", resp.Allowed, resp.Result, admission.MaxCauses, more)
	}
}
