package deploy_test

import (
	"encoding/json"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// pendingMetrics are on the dashboard before the components that export
// them: their owners are asked to use these names.
var pendingMetrics = map[string]string{}

var metricName = regexp.MustCompile(`trustmesh_[a-z0-9_]+`)

// exported returns the trustmesh_ metric names that appear as string
// literals in the repository's non-test Go code.
func exported(t *testing.T) map[string]bool {
	t.Helper()
	literal := regexp.MustCompile(`"(trustmesh_[a-z0-9_]+)"`)
	names := map[string]bool{}
	err := filepath.WalkDir("..", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if d.IsDir() || !strings.HasSuffix(p, ".go") || strings.HasSuffix(p, "_test.go") {
			return nil
		}
		src, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		for _, m := range literal.FindAllStringSubmatch(string(src), -1) {
			names[m[1]] = true
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return names
}

// TestDashboard checks that the Grafana dashboard parses and queries only
// metrics that trustmesh exports (or that are agreed and pending), so that
// a renamed metric cannot silently empty a panel.
func TestDashboard(t *testing.T) {
	raw, err := os.ReadFile("charts/trustmesh/files/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d struct {
		UID    string `json:"uid"`
		Panels []struct {
			Type    string `json:"type"`
			Title   string `json:"title"`
			Targets []struct {
				Expr string `json:"expr"`
			} `json:"targets"`
		} `json:"panels"`
	}
	if err := json.Unmarshal(raw, &d); err != nil {
		t.Fatal(err)
	}
	have := exported(t)
	used := map[string]bool{}
	for _, p := range d.Panels {
		if p.Type == "row" {
			continue
		}
		if len(p.Targets) == 0 {
			t.Errorf("panel %q has no query", p.Title)
		}
		for _, target := range p.Targets {
			for _, m := range metricName.FindAllString(target.Expr, -1) {
				for _, suffix := range []string{"_bucket", "_sum", "_count"} {
					if base, ok := strings.CutSuffix(m, suffix); ok && strings.HasSuffix(base, "_seconds") {
						m = base
					}
				}
				used[m] = true
				if !have[m] && pendingMetrics[m] == "" {
					t.Errorf("panel %q queries %s, which nothing exports", p.Title, m)
				}
			}
		}
	}
	for _, area := range []string{"trustmesh_ca_issued", "trustmesh_ca_refused", "trustmesh_ca_certificate_expiry",
		"trustmesh_authz_decisions", "trustmesh_authz_check_duration", "trustmesh_xds_pushes",
		"trustmesh_node_proxy_connections_opened", "trustmesh_node_proxy_connections_refused", "trustmesh_node_proxy_connections_closed",
		"trustmesh_node_proxy_bytes", "trustmesh_node_proxy_hbone_handshake_failures"} {
		found := false
		for m := range used {
			found = found || strings.HasPrefix(m, area)
		}
		if !found {
			t.Errorf("the dashboard shows nothing for %s", area)
		}
	}
	for m, owner := range pendingMetrics {
		if have[m] {
			t.Logf("%s is now exported; drop it from pendingMetrics", m)
		} else {
			t.Logf("pending: %s (%s)", m, owner)
		}
	}
}
