package main

import (
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestAnalyzeMixedManifests runs `analyze -f` on a directory of mixed
// manifests, as `istioctl analyze -f` is run: the mesh objects are judged
// by the mesh's checks (a PERMISSIVE PeerAuthentication is TMA030), the
// kinds trustmesh does not read are skipped with one note on stderr, and
// only a finding at --fail-on sets the exit code.
func TestAnalyzeMixedManifests(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "manifests")
	writeFiles(t, dir, map[string]string{
		"app.yaml": `apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 80}]}
`,
		"mesh.yaml": `apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: shop}
spec: {mtls: {mode: PERMISSIVE}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec: {hosts: [web], http: [{route: [{destination: {host: web}}]}]}
`,
		"policy.yaml": `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: allow-web, namespace: shop}
spec: {rules: [{to: [{operation: {methods: [GET]}}]}]}
`,
	})
	stdout, stderr, code := runAnalyze(t, "-f", dir, "-o", "json")
	if code != 0 {
		t.Fatalf("exit %d; want 0 (warnings only)\n%s\n%s", code, stdout, stderr)
	}
	rep := analyzeReport(t, stdout)
	if codes := codesOf(rep); !slices.Equal(codes, []string{"TMA030 PeerAuthentication shop/default"}) {
		t.Errorf("findings %v: want only TMA030 for the PeerAuthentication", codes)
	}
	if !slices.Contains(rep.Notes, "skipped 2 document(s) of kinds trustmesh does not read from -f: Deployment (1), Service (1)") {
		t.Errorf("notes %q do not count the skipped kinds", rep.Notes)
	}
	for _, n := range rep.Notes {
		if strings.HasPrefix(n, "TMA030 ") || strings.HasPrefix(n, "TMA031 ") {
			t.Errorf("note %q: the mesh objects of -f were analyzed", n)
		}
	}
	if _, stderr, code := runAnalyze(t, "-f", dir); code != 0 || !strings.Contains(stderr, "note: skipped 2 document(s)") {
		t.Errorf("table output: exit %d, stderr %q; want 0 and the note", code, stderr)
	}
	if _, _, code := runAnalyze(t, "-f", dir, "--fail-on", "warning"); code != exitFindings {
		t.Errorf("--fail-on warning: exit %d, want %d", code, exitFindings)
	}
}
