package controlplane_test

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/controlplane"
)

// TestServeUIAccessRedactsAsTheDecisionLog: the access view quotes a
// policy's header value and path as serve's decision log would quote a
// request's (the header not allowlisted, the path through
// --log-redact-path), not verbatim.
func TestServeUIAccessRedactsAsTheDecisionLog(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "echo.yaml"), []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-callers, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/demo/sa/client"]}}]
    to: [{operation: {paths: ["/reset/tok-8f3a9c*"]}}]
    when: [{key: "request.headers[x-api-key]", values: [sk_live_SUPERSECRET]}]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	e := start(t, func(c *controlplane.Config) {
		c.Listen.UI = "127.0.0.1:0"
		c.XDS.MeshDir = "../examples/mesh"
		c.Authz.PolicyDir = dir
		c.Authz.LogRedactPaths = []string{`^/reset/(.*)`}
	})
	var acc struct {
		PolicyVersion uint64 `json:"policy_version"`
		Cells         []struct {
			From, To, Verdict string
			Conditions        []string
		} `json:"cells"`
	}
	// The policies load after start: wait for a policy version.
	for deadline := time.Now().Add(10 * time.Second); acc.PolicyVersion == 0 && time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		r, err := http.Get("http://" + e.cp.Addrs().UI.String() + "/ui/api/access")
		if err != nil {
			t.Fatal(err)
		}
		if r.StatusCode == http.StatusServiceUnavailable { // not loaded yet
			r.Body.Close()
			continue
		}
		err = json.NewDecoder(r.Body).Decode(&acc)
		r.Body.Close()
		if err != nil || r.StatusCode != 200 {
			t.Fatalf("GET /ui/api/access: %d %v", r.StatusCode, err)
		}
	}
	var conds string
	for _, c := range acc.Cells {
		if c.From == "demo/client" && c.To == "demo/echo" {
			conds = strings.Join(c.Conditions, "\n")
		}
	}
	for _, want := range []string{`request.headers[x-api-key] is "REDACTED"`, `request.path starts with "/reset/REDACTED"`} {
		if !strings.Contains(conds, want) {
			t.Errorf("demo/client -> demo/echo conditions do not say %s:\n%s\n%+v", want, conds, acc)
		}
	}
	for _, secret := range []string{"SUPERSECRET", "tok-8f3a9c"} {
		if strings.Contains(conds, secret) {
			t.Errorf("demo/client -> demo/echo conditions show %q:\n%s", secret, conds)
		}
	}
}
