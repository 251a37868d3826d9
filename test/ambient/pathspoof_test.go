package ambient

import (
	"context"
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"
)

// TestPathSelectorNotSpoofedFromOwnMountNamespace (review15-sec F2): an
// unprivileged user makes a user and mount namespace of its own, binds its
// program over the path a Node entry trusts and runs it there, so that
// /proc/PID/exe reads that path. The node agent matches unix:path: only in
// its own mount namespace: the user gets the identity its uid and gid
// select, never the one its uid plus the spoofed path would.
func TestPathSelectorNotSpoofedFromOwnMountNamespace(t *testing.T) {
	needRoot(t)
	const trusted = "/usr/bin/true" // the program the operator meant to trust
	nodes := fmt.Sprintf(`apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: node-a}
spec:
  workloads:
  - spiffeID: %s
    selectors: {uid: 65534, path: %s}
  - spiffeID: %s
    selectors: {uid: 65534, gid: 65534}
`, sa("payroll"), trusted, sa("nobody"))
	s := startServe(t, map[string]string{"nodes.yaml": nodes})
	node := joinNode(t, s, "node-a")
	node.start(t, s)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	var r result
	for i := 0; ; i++ {
		script := fmt.Sprintf("mount --bind %s %s && exec %s -socket %s -timeout 15s", workloadBin, trusted, trusted, node.socket)
		cmd := exec.CommandContext(ctx, "setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
			"unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script)
		var stderr strings.Builder
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("the user's program: %v\n%s", err, stderr.String())
		}
		r = result{}
		if err := json.Unmarshal(out, &r); err != nil {
			t.Fatalf("the user's program printed %q: %v", out, err)
		}
		// Until the node holds its entries the caller waits, then is refused.
		if len(r.IDs) > 0 || i == 20 {
			break
		}
		time.Sleep(time.Second)
	}
	if want := []string{sa("nobody")}; !slices.Equal(r.IDs, want) {
		t.Fatalf("uid 65534 in its own user and mount namespace, running its program over %s, got %v (code %q %s); want exactly %v",
			trusted, r.IDs, r.Code, r.Error, want)
	}
}
