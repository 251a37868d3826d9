package analyze

import (
	"slices"
	"strings"
	"testing"
)

// TestRuleMessages holds the rule analyzers' messages to what the issue
// asks them to say: the deciding DENY, which case an empty ALLOW is in,
// whether dropped HTTP fields broaden or narrow.
func TestRuleMessages(t *testing.T) {
	for _, tc := range []struct {
		file, code, object, field string
		want                      []string
	}{
		{"TMA011_report", "TMA011", "AuthorizationPolicy shop/allow-orders", "spec.rules[0]", []string{"DENY policy shop/deny-admin spec.rules[0]", "the DENY decides"}},
		{"TMA011_report", "TMA011", "AuthorizationPolicy shop/allow-scanner", "spec.rules[0]", []string{"DENY policy istio-system/deny-attackers spec.rules[0]", "the DENY decides"}},
		{"TMA011_report_together", "TMA011", "AuthorizationPolicy shop/allow-ops", "spec.rules[0]", []string{"one of the DENY rules shop/deny-internal spec.rules[0], shop/deny-internal spec.rules[1] (", "the DENY decides"}},
		{"TMA012_report", "TMA012", "AuthorizationPolicy shop/lock-orders", "spec.rules", []string{"(shop/orders-0), so they are denied every request", "rules: [{}]"}},
		{"TMA012_report", "TMA012", "AuthorizationPolicy shop/lock-web", "spec.rules", []string{"another ALLOW policy (such as shop/allow-web), so this policy changes nothing", "rules: [{}]"}},
		{"TMA012_report_nomesh", "TMA012", "AuthorizationPolicy shop/lock-orders", "spec.rules", []string{"this policy changes nothing", "denies it every request", "--mesh", "rules: [{}]"}},
		{"TMA013_report", "TMA013", "AuthorizationPolicy istio-system/deny-all", "spec.rules[0]", []string{"denies every request to every workload in the mesh"}},
		{"TMA014_report", "TMA014", "AuthorizationPolicy shop/deny-db-admin", "spec.rules[0]", []string{"operation.paths", "5432", "broadens this DENY", "denies all TCP traffic"}},
		{"TMA014_report", "TMA014", "AuthorizationPolicy shop/allow-db-reads", "spec.rules[0]", []string{"operation.methods", "narrows this ALLOW", "allows no TCP traffic"}},
		{"TMA015_report", "TMA015", "AuthorizationPolicy shop/deny-orders-admin", "spec.rules[0]", []string{"operation.paths", "shop/orders-0", "node proxy (L4)", "broadens this DENY", "denies every connection", "waypoint"}},
		{"TMA015_report", "TMA015", "AuthorizationPolicy shop/allow-orders-reads", "spec.rules[0]", []string{"operation.methods", "shop/orders-0", "narrows this ALLOW", "no traffic at all", "waypoint"}},
		{"TMA010_report", "TMA010", "AuthorizationPolicy shop/deny-dead", "spec.rules[2]", []string{"source.ip: spec.rules[2].from[0].source.ipBlocks and spec.rules[2].when[0].notValues exclude each other"}},
	} {
		t.Run(tc.file+"/"+tc.object+"/"+tc.field, func(t *testing.T) {
			in, _, _ := loadCase(t, "testdata/cases/"+tc.file+".yaml")
			i := slices.IndexFunc(All, func(a Analyzer) bool { return a.Code == tc.code })
			if i < 0 {
				t.Fatalf("no analyzer %s", tc.code)
			}
			found := false
			for _, f := range Run(in, All[i:i+1]).Findings {
				if f.Object != tc.object || f.Field != tc.field {
					continue
				}
				found = true
				for _, w := range tc.want {
					if !strings.Contains(f.Message, w) {
						t.Errorf("%s %s: message %q does not say %q", f.Object, f.Field, f.Message, w)
					}
				}
			}
			if !found {
				t.Errorf("no %s finding about %s %s", tc.code, tc.object, tc.field)
			}
		})
	}
}
