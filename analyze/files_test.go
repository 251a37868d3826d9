package analyze

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestFilesReadMeshKinds: the mesh objects of -f's files are judged by the
// mesh's own checks (meshcheck, as the admission webhook judges them), and
// give, finding for finding, what the mesh analyzers report when the same
// objects are the mesh (--mesh): each TMA030/TMA031 case file, read with
// -f, reports what its case expects.
func TestFilesReadMeshKinds(t *testing.T) {
	files, err := filepath.Glob("testdata/cases/TMA03[01]_*.yaml")
	if err != nil || len(files) < 4 {
		t.Fatalf("case files: %v %v", files, err)
	}
	for _, path := range files {
		t.Run(filepath.Base(path), func(t *testing.T) {
			in, invalid, exp := loadCase(t, path)
			if len(invalid) > 0 {
				t.Fatalf("the case's policies are refused: %v", invalid)
			}
			i := slices.IndexFunc(All, func(a Analyzer) bool { return a.Code == exp.Analyzer })
			want := Run(in, All[i:i+1]).Findings
			rep, err := Analyze(context.Background(), Config{Files: []string{path}, Analyzers: []Analyzer{}})
			if err != nil {
				t.Fatal(err)
			}
			// Only the case's analyzer: a case may hold objects another
			// analyzer reports.
			var got []Finding
			for _, f := range rep.Findings {
				if !strings.HasPrefix(f.Origin, path+":") {
					t.Errorf("finding %+v does not name its line in %s", f, path)
				}
				f.Origin = "" // the mesh's findings have none
				if f.Code == exp.Analyzer {
					got = append(got, f)
				}
			}
			if !slices.Equal(got, want) {
				t.Errorf("-f reports\n %+v\nthe mesh analyzers\n %+v", got, want)
			}
			if len(exp.Findings) != len(got) {
				t.Errorf("-f reports %d findings, the case expects %d", len(got), len(exp.Findings))
			}
			// The case's Expect document is a kind trustmesh does not read.
			if !slices.Contains(rep.Notes, "skipped 1 document(s) of kinds trustmesh does not read from -f: Expect (1)") {
				t.Errorf("notes %q do not name the skipped Expect document", rep.Notes)
			}
		})
	}
}

// mixed is a file of mixed manifests, as `istioctl analyze -f` reads them.
const mixed = `apiVersion: apps/v1
kind: Deployment
metadata: {name: web, namespace: shop}
spec:
  template: {metadata: {labels: {app: web}}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: shop}
spec:
  rules: [{from: [{source: {requestPrincipals: ["iss/sub"]}}]}]
---
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec: {ports: [{port: 80}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: ingress, namespace: shop}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: ["*"]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: shop}
spec:
  hosts: [web]
  http: [{route: [{destination: {host: web}}]}]
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: bad, namespace: shop}
spec: {mtls: {mode: SOMETIMES}}
---
apiVersion: security.istio.io/v2
kind: PeerAuthentication
metadata: {name: future, namespace: shop}
spec: {}
---
apiVersion: v1
kind: ConfigMap
metadata: {name: c, namespace: shop}
data: {k: v}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: good, namespace: shop}
spec: {}
`

// TestFilesOfMixedKinds: -f on a file of mixed manifests reports the
// AuthorizationPolicies as on a file of them alone (same message, same
// line), the mesh objects by the mesh's checks, an Istio object that does
// not decode or of a version no CRD serves as TMA000, and skips the kinds
// trustmesh does not read with one note that counts them.
func TestFilesOfMixedKinds(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "all.yaml")
	if err := os.WriteFile(path, []byte(mixed), 0o600); err != nil {
		t.Fatal(err)
	}
	rep, err := Analyze(context.Background(), Config{Files: []string{dir}, Analyzers: []Analyzer{}})
	if err != nil {
		t.Fatal(err)
	}
	// The policies alone: the file with every other document blanked.
	alone := &Policies{DefaultNamespace: "default"}
	docs, err := splitDocuments([]byte(mixed))
	if err != nil {
		t.Fatal(err)
	}
	var policyFindings []Finding
	for _, d := range docs {
		if strings.Contains(string(d.raw), "kind: AuthorizationPolicy") {
			alone.AddFile(path, d.only([]byte(mixed)))
		}
	}
	policyFindings = alone.Findings()
	if len(policyFindings) != 1 || len(alone.Policies()) != 1 {
		t.Fatalf("the policies alone: findings %+v, policies %v; want jwt refused, good loaded", policyFindings, alone.Policies())
	}
	type key struct{ Code, Object, Field string }
	var got []key
	for _, f := range rep.Findings {
		t.Logf("%s %s %s %s (%s): %s", f.Code, f.Severity, f.Object, f.Field, f.Origin, f.Message)
		got = append(got, key{f.Code, f.Object, f.Field})
		if f.Object == "AuthorizationPolicy shop/jwt" && f != policyFindings[0] {
			t.Errorf("among other kinds, the policy is refused as\n %+v\nalone as\n %+v", f, policyFindings[0])
		}
	}
	want := []key{
		{"TMA000", "AuthorizationPolicy shop/jwt", "spec.rules[0].from[0].source.requestPrincipals"},
		{"TMA031", "Gateway shop/ingress", ""},
		{"TMA000", "PeerAuthentication shop/bad", ""},
		{"TMA000", "PeerAuthentication shop/future", ""},
	}
	if !slices.Equal(got, want) {
		t.Errorf("findings\n %+v\nwant\n %+v", got, want)
	}
	for _, f := range rep.Findings {
		if f.Object == "Gateway shop/ingress" && f.Origin != path+":18" {
			t.Errorf("the Gateway's finding is in %s, want %s:18", f.Origin, path)
		}
	}
	note := "skipped 3 document(s) of kinds trustmesh does not read from -f: ConfigMap (1), Deployment (1), Service (1)"
	if !slices.Contains(rep.Notes, note) {
		t.Errorf("notes %q, want %q", rep.Notes, note)
	}
}
