package main

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	securityv1 "istio.io/client-go/pkg/apis/security/v1"
	istioclient "istio.io/client-go/pkg/clientset/versioned"
	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	clientcmdapi "k8s.io/client-go/tools/clientcmd/api"
	"sigs.k8s.io/controller-runtime/pkg/envtest"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/analyze"
	"github.com/trustmesh/trustmesh/test/kubeapi"
)

// runAnalyze runs `trustmesh analyze` and returns its stdout, stderr and
// exit code.
func runAnalyze(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(binary, append([]string{"analyze"}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return stdout.String(), stderr.String(), 0
	case errors.As(err, &ee):
		return stdout.String(), stderr.String(), ee.ExitCode()
	}
	t.Fatalf("trustmesh analyze %s: %v", strings.Join(args, " "), err)
	return "", "", 0
}

func writeFiles(t *testing.T, dir string, files map[string]string) {
	t.Helper()
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func analyzeReport(t *testing.T, stdout string) analyze.Report {
	t.Helper()
	var rep analyze.Report
	if err := json.Unmarshal([]byte(stdout), &rep); err != nil {
		t.Fatalf("analyze -o json: %v\n%s", err, stdout)
	}
	return rep
}

func codesOf(rep analyze.Report) []string {
	var out []string
	for _, f := range rep.Findings {
		out = append(out, f.Code+" "+f.Object)
	}
	slices.Sort(out)
	return out
}

const (
	analyzeGood = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: orders, namespace: shop}
spec:
  selector:
    matchLabels: {app: orders}
  rules:
  - from: [{source: {principals: ["cluster.local/ns/shop/sa/web"]}}]
`
	analyzeTypo = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo, namespace: shop}
spec:
  selector:
    matchLabels: {app: order}
  rules: [{}]
`
	analyzeBad = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: jwt, namespace: shop}
spec:
  rules:
  - from: [{source: {requestPrincipals: ["issuer/subject"]}}]
`
	analyzeMesh = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: orders-0, namespace: shop}
spec:
  spiffeID: spiffe://cluster.local/ns/shop/sa/orders
  labels: {app: orders}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: shop}
spec:
  spiffeID: spiffe://cluster.local/ns/shop/sa/web
  labels: {app: web}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: PERMISSIVE}
`
)

// TestAnalyzeFiles runs the command on files: a refused policy is a TMA000
// error and the command goes on to the other files; --fail-on sets the exit
// code (3 on findings at or above it, as check does; 2 on bad flags or
// unreadable input); notes go to stderr in table mode and into the JSON.
func TestAnalyzeFiles(t *testing.T) {
	dir := t.TempDir()
	pol, meshDir := filepath.Join(dir, "policies"), filepath.Join(dir, "mesh")
	writeFiles(t, pol, map[string]string{"a-bad.yaml": analyzeBad, "b-good.yaml": analyzeGood, "c-typo.yaml": analyzeTypo})
	writeFiles(t, meshDir, map[string]string{"mesh.yaml": analyzeMesh})

	stdout, stderr, code := runAnalyze(t, "-f", pol, "--mesh", meshDir, "-o", "json")
	if code != exitFindings {
		t.Errorf("a refused policy: exit %d, want %d\n%s", code, exitFindings, stderr)
	}
	rep := analyzeReport(t, stdout)
	want := []string{"TMA000 AuthorizationPolicy shop/jwt", "TMA001 AuthorizationPolicy shop/typo", "TMA030 PeerAuthentication istio-system/default"}
	if got := codesOf(rep); !slices.Equal(got, want) {
		t.Errorf("findings = %q, want %q", got, want)
	}
	for _, f := range rep.Findings {
		if f.Code == "TMA000" && (f.Severity != analyze.SeverityError || f.Field != "spec.rules[0].from[0].source.requestPrincipals" || !strings.Contains(f.Message, "not supported")) {
			t.Errorf("TMA000 finding %+v", f)
		}
	}
	if !slices.ContainsFunc(rep.Notes, func(n string) bool { return strings.HasPrefix(n, "TMA020") }) {
		t.Errorf("JSON notes %q do not say that TMA020 was skipped", rep.Notes)
	}

	// Table: the findings on stdout, the notes on stderr.
	stdout, stderr, _ = runAnalyze(t, "-f", pol, "--mesh", meshDir)
	for _, s := range []string{"SEVERITY", "TMA000", "shop/jwt", "TMA001", "spec.selector.matchLabels", "1 error(s), 2 warning(s), 0 info"} {
		if !strings.Contains(stdout, s) {
			t.Errorf("table does not show %q:\n%s", s, stdout)
		}
	}
	if !strings.Contains(stderr, "note: TMA020") || strings.Contains(stdout, "note:") {
		t.Errorf("notes belong on stderr:\nstdout:\n%s\nstderr:\n%s", stdout, stderr)
	}

	// Without the refused file, only warnings: --fail-on decides.
	warnOnly := []string{"-f", filepath.Join(pol, "b-good.yaml"), "-f", filepath.Join(pol, "c-typo.yaml"), "--mesh", meshDir}
	for _, c := range []struct {
		failOn string
		code   int
	}{{"", 0}, {"error", 0}, {"warning", exitFindings}, {"info", exitFindings}, {"none", 0}} {
		args := warnOnly
		if c.failOn != "" {
			args = append(slices.Clone(args), "--fail-on", c.failOn)
		}
		if _, stderr, code := runAnalyze(t, args...); code != c.code {
			t.Errorf("warnings only, --fail-on %q: exit %d, want %d\n%s", c.failOn, code, c.code, stderr)
		}
	}
	if _, _, code := runAnalyze(t, "-f", pol, "--mesh", meshDir, "--fail-on", "none"); code != 0 {
		t.Errorf("--fail-on none with an error finding: exit %d, want 0", code)
	}

	// Usage errors exit 2.
	for _, args := range [][]string{
		{},
		{"-f", filepath.Join(dir, "missing")},
		{"-f", pol, "--fail-on", "critical"},
		{"-f", pol, "-o", "xml"},
		{"-f", pol, "--stale-dry-run", "soon"},
		{"-f", pol, "--trust-domain", "Not A Domain"},
		{"-f", pol, "--kubeconfig", filepath.Join(dir, "kubeconfig")},
		{"-f", pol, "--mesh", pol},
	} {
		if _, stderr, code := runAnalyze(t, args...); code != 2 {
			t.Errorf("analyze %q: exit %d, want 2\n%s", args, code, stderr)
		}
	}

	// The shipped examples, as README runs them, are clean.
	for _, args := range [][]string{
		{"-f", "../../examples/policies"},
		{"-f", "../../examples/mesh/policies", "--mesh", "../../examples/mesh"},
	} {
		stdout, stderr, code := runAnalyze(t, append(args, "-o", "json")...)
		if code != 0 {
			t.Errorf("analyze %q: exit %d\n%s", args, code, stderr)
			continue
		}
		if rep := analyzeReport(t, stdout); len(rep.Findings) != 0 {
			t.Errorf("analyze %q: findings %+v", args, rep.Findings)
		}
	}
}

// TestAnalyzeCluster runs the command against a real kube-apiserver: the
// policies come with their creation times, so a dry-run policy is reported
// once it is older than --stale-dry-run (judged --at a later time); the
// mesh comes from the cluster's pods; a stored policy the engine refuses is
// a TMA000 error.
func TestAnalyzeCluster(t *testing.T) {
	env, restConfig, err := kubeapi.Start()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = env.Stop() })
	crds, err := kubeapi.IstioCRDs()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := envtest.InstallCRDs(restConfig, envtest.CRDInstallOptions{Paths: crds, ErrorIfPathMissing: true}); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	kc, err := kubernetes.NewForConfig(restConfig)
	if err != nil {
		t.Fatal(err)
	}
	ic, err := istioclient.NewForConfig(restConfig)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := kc.CoreV1().Namespaces().Create(ctx, &corev1.Namespace{ObjectMeta: metav1.ObjectMeta{Name: "shop"}}, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	pod := &corev1.Pod{
		ObjectMeta: metav1.ObjectMeta{Name: "orders-0", Namespace: "shop", Labels: map[string]string{"app": "orders"}},
		Spec:       corev1.PodSpec{ServiceAccountName: "orders", Containers: []corev1.Container{{Name: "app", Image: "orders"}}},
	}
	if _, err := kc.CoreV1().Pods("shop").Create(ctx, pod, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	for _, doc := range []string{
		analyzeTypo,
		analyzeBad, // the CRD schema lets it through; the engine refuses it
		`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: tighter
  namespace: shop
  annotations: {istio.io/dry-run: "true"}
spec:
  selector:
    matchLabels: {app: orders}
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
`} {
		var ap securityv1.AuthorizationPolicy
		if err := yaml.UnmarshalStrict([]byte(doc), &ap); err != nil {
			t.Fatal(err)
		}
		if _, err := ic.SecurityV1().AuthorizationPolicies("shop").Create(ctx, &ap, metav1.CreateOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	kubeconfig := writeKubeconfig(t, restConfig)

	now := time.Now().UTC()
	for _, c := range []struct {
		at   time.Time
		want []string
	}{
		{now, []string{"TMA000 AuthorizationPolicy shop/jwt", "TMA001 AuthorizationPolicy shop/typo"}},
		{now.Add(20 * 24 * time.Hour), []string{"TMA000 AuthorizationPolicy shop/jwt", "TMA001 AuthorizationPolicy shop/typo", "TMA020 AuthorizationPolicy shop/tighter"}},
	} {
		stdout, stderr, code := runAnalyze(t, "--kubeconfig", kubeconfig, "--at", c.at.Format(time.RFC3339), "-o", "json")
		if code != exitFindings {
			t.Fatalf("--at %s: exit %d, want %d for the refused policy\n%s", c.at, code, exitFindings, stderr)
		}
		rep := analyzeReport(t, stdout)
		if got := codesOf(rep); !slices.Equal(got, c.want) {
			t.Errorf("--at %s: findings %q, want %q", c.at, got, c.want)
		}
		if slices.ContainsFunc(rep.Notes, func(n string) bool { return strings.HasPrefix(n, "TMA020") || strings.HasPrefix(n, "TMA001") }) {
			t.Errorf("on a cluster TMA001 and TMA020 run, but notes say %q", rep.Notes)
		}
	}
	// --stale-dry-run takes days, and a longer one spares the policy;
	// --context picks the kubeconfig's context.
	stdout, stderr, code := runAnalyze(t, "--kubeconfig", kubeconfig, "--context", "envtest", "--at", now.Add(20*24*time.Hour).Format(time.RFC3339),
		"--stale-dry-run", "30d", "--fail-on", "none", "-o", "json")
	if code != 0 {
		t.Errorf("--fail-on none: exit %d, want 0\n%s", code, stderr)
	}
	if got := codesOf(analyzeReport(t, stdout)); slices.Contains(got, "TMA020 AuthorizationPolicy shop/tighter") {
		t.Errorf("--stale-dry-run 30d: findings %q", got)
	}
	if _, stderr, code := runAnalyze(t, "--kubeconfig", kubeconfig, "--context", "elsewhere"); code != 2 {
		t.Errorf("--context of no such context: exit %d, want 2\n%s", code, stderr)
	}
}

// writeKubeconfig writes a kubeconfig for the envtest apiserver.
func writeKubeconfig(t *testing.T, c *rest.Config) string {
	t.Helper()
	cfg := clientcmdapi.NewConfig()
	cfg.Clusters["envtest"] = &clientcmdapi.Cluster{Server: c.Host, CertificateAuthorityData: c.CAData}
	cfg.AuthInfos["envtest"] = &clientcmdapi.AuthInfo{ClientCertificateData: c.CertData, ClientKeyData: c.KeyData, Token: c.BearerToken}
	cfg.Contexts["envtest"] = &clientcmdapi.Context{Cluster: "envtest", AuthInfo: "envtest"}
	cfg.CurrentContext = "envtest"
	path := filepath.Join(t.TempDir(), "kubeconfig")
	if err := clientcmd.WriteToFile(*cfg, path); err != nil {
		t.Fatal(err)
	}
	return path
}
