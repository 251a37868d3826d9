package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestPolicyWhoCan runs `policy who-can` on the shipped local mesh: the
// client may call echo's health service only, echo may not call itself;
// an edit of the policy changes the answer; bad questions exit 2.
func TestPolicyWhoCan(t *testing.T) {
	base := []string{"policy", "who-can", "--policies", "../../examples/mesh/policies", "--mesh", "../../examples/mesh"}
	out, err := exec.Command(binary, append(base, "--to", "demo/echo")...).Output()
	if err != nil {
		t.Fatalf("%v: %s", err, stderrOf(err))
	}
	for _, want := range []string{
		"demo/client  demo/echo  7070  conditional  demo/echo-callers  0     depends on the request",
		"demo/echo    demo/echo  7070  denied       -                  -     no ALLOW rule matches (ALLOW policies: demo/echo-callers)",
		"demo/client -> demo/echo:7070 is conditional:\n" +
			`  allowed by ALLOW demo/echo-callers rule 0 when request.path starts with "/grpc.health.v1.Health/"` + "\n" +
			"  denied otherwise: no ALLOW rule matches (ALLOW policies: demo/echo-callers)\n",
	} {
		if !strings.Contains(string(out), want) {
			t.Errorf("who-can --to demo/echo does not say\n%s\nit says\n%s", want, out)
		}
	}

	// The client's principal no longer listed: denied, for every port
	// (named or not), in JSON and YAML alike.
	dir := t.TempDir()
	pol, err := os.ReadFile("../../examples/mesh/policies/echo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	edited := strings.Replace(string(pol), `principals: ["cluster.local/ns/demo/sa/client"]`, `principals: ["cluster.local/ns/demo/sa/someone-else"]`, 1)
	if edited == string(pol) {
		t.Fatal("the example policy no longer names the client's principal as this test expects")
	}
	if err := os.WriteFile(filepath.Join(dir, "echo.yaml"), []byte(edited), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"--from", "demo/client", "-o", "json"}, {"--to", "demo/echo:grpc", "-o", "json"}, {"--to", "demo/echo:7070", "-o", "yaml"}} {
		out, err := exec.Command(binary, append([]string{"policy", "who-can", "--policies", dir, "--mesh", "../../examples/mesh"}, args...)...).Output()
		if err != nil {
			t.Fatalf("%v: %s", err, stderrOf(err))
		}
		if args[len(args)-1] == "yaml" {
			if !strings.Contains(string(out), "verdict: denied") || strings.Contains(string(out), "verdict: conditional") {
				t.Errorf("who-can %s after the edit:\n%s", args, out)
			}
			continue
		}
		var a struct {
			Cells []struct {
				From, To, Verdict, Reason string
				Port                      uint32
			}
		}
		if err := json.Unmarshal(out, &a); err != nil {
			t.Fatalf("%v: %s", err, out)
		}
		found := false
		for _, c := range a.Cells {
			if c.From == "demo/client" && c.To == "demo/echo" && c.Port == 7070 {
				found = true
				if c.Verdict != "denied" || !strings.HasPrefix(c.Reason, "no ALLOW rule matches") {
					t.Errorf("who-can %s after the edit: %+v", args, c)
				}
			}
		}
		if !found {
			t.Errorf("who-can %s: no cell demo/client -> demo/echo:7070 in %s", args, out)
		}
	}

	exitCode(t, 2, base...)
	exitCode(t, 2, append(base, "--to", "demo/echo", "--from", "demo/client")...)
	exitCode(t, 2, append(base, "--to", "demo/nosuch")...)
	exitCode(t, 2, append(base, "--to", "demo/client")...) // a caller that serves nothing
	exitCode(t, 2, append(base, "--to", "demo/echo:80")...)
	exitCode(t, 2, append(base, "--from", "demo/nosuch")...)
	exitCode(t, 2, append(base, "--to", "demo/echo", "-o", "xml")...)
	exitCode(t, 2, append(base, "--to", "demo/echo", "--trust-domain", "example.org")...)
	exitCode(t, 2, "policy", "who-can", "--policies", "../../examples/mesh/policies", "--to", "demo/echo")
	exitCode(t, 2, "policy", "who-can", "--mesh", "../../examples/mesh", "--to", "demo/echo")
	exitCode(t, 2, "policy", "who-can", "--policies", filepath.Join(dir, "missing"), "--mesh", "../../examples/mesh", "--to", "demo/echo")
}

// TestPolicyWhoCanRedacts: who-can quotes a policy's header values and
// paths as explain and the decision log quote a request's: a header's value
// only when --log-header-allowlist names it, paths through
// --log-redact-path.
func TestPolicyWhoCanRedacts(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "echo.yaml"), []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: echo-callers, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  rules:
  - to: [{operation: {paths: ["/reset/tok-8f3a9c*"]}}]
    when: [{key: "request.headers[x-api-key]", values: [sk_live_SUPERSECRET]}]
`), 0o600); err != nil {
		t.Fatal(err)
	}
	base := []string{"policy", "who-can", "--policies", dir, "--mesh", "../../examples/mesh", "--to", "demo/echo"}
	for _, tc := range []struct {
		args       []string
		want, hide []string
	}{
		{nil, []string{`request.headers[x-api-key] is "REDACTED"`, `request.path starts with "/reset/tok-8f3a9c"`}, []string{"SUPERSECRET"}},
		{[]string{"--log-redact-path", `^/reset/(.*)`}, []string{`request.headers[x-api-key] is "REDACTED"`, `request.path starts with "/reset/REDACTED"`}, []string{"SUPERSECRET", "tok-8f3a9c"}},
		{[]string{"--log-header-allowlist", "X-Api-Key"}, []string{`request.headers[x-api-key] is "sk_live_SUPERSECRET"`}, nil},
	} {
		out, err := exec.Command(binary, append(base, tc.args...)...).Output()
		if err != nil {
			t.Fatalf("who-can %s: %v: %s", tc.args, err, stderrOf(err))
		}
		for _, w := range tc.want {
			if !strings.Contains(string(out), w) {
				t.Errorf("who-can %s does not say %s:\n%s", tc.args, w, out)
			}
		}
		for _, h := range tc.hide {
			if strings.Contains(string(out), h) {
				t.Errorf("who-can %s shows %q:\n%s", tc.args, h, out)
			}
		}
	}
	exitCode(t, 2, append(base, "--log-redact-path", "(")...)
}
