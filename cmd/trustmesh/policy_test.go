package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
)

// TestPolicyCheckBatch runs `policy check --requests` on the shipped
// example requests, as a JSON array from a file and as JSON lines on
// stdin, and checks each line against `policy check --request` on the
// same request.
func TestPolicyCheckBatch(t *testing.T) {
	policyArgs := []string{"policy", "check", "--policies", "../../examples/policies", "--bundle", "../../policies/envoy"}
	files, err := filepath.Glob("../../examples/policies/requests/*.json")
	if err != nil || len(files) < 2 {
		t.Fatalf("example requests: %v %v", files, err)
	}
	var singles []any
	var compact []string
	for _, f := range files {
		out, err := exec.Command(binary, append(policyArgs, "--request", f)...).Output()
		if err != nil {
			t.Fatalf("policy check --request %s: %v", f, err)
		}
		var d any
		if err := json.Unmarshal(out, &d); err != nil {
			t.Fatal(err)
		}
		singles = append(singles, d)
		raw, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		var b bytes.Buffer
		if err := json.Compact(&b, raw); err != nil {
			t.Fatal(err)
		}
		compact = append(compact, b.String())
	}
	array := filepath.Join(t.TempDir(), "requests.json")
	if err := os.WriteFile(array, []byte("["+strings.Join(compact, ",\n")+"]"), 0o600); err != nil {
		t.Fatal(err)
	}
	for name, run := range map[string]*exec.Cmd{
		"array file":        exec.Command(binary, append(policyArgs, "--requests", array)...),
		"JSON lines, stdin": exec.Command(binary, append(policyArgs, "--requests", "-")...),
	} {
		t.Run(name, func(t *testing.T) {
			run.Stdin = strings.NewReader(strings.Join(compact, "\n") + "\n")
			out, err := run.Output()
			if err != nil {
				t.Fatalf("%v: %s", err, stderrOf(err))
			}
			lines := strings.Split(strings.TrimSuffix(string(out), "\n"), "\n")
			if len(lines) != len(singles) {
				t.Fatalf("%d lines for %d requests:\n%s", len(lines), len(singles), out)
			}
			for i, l := range lines {
				var d any
				if err := json.Unmarshal([]byte(l), &d); err != nil {
					t.Fatalf("line %d: %v", i+1, err)
				}
				if !reflect.DeepEqual(d, singles[i]) {
					t.Errorf("line %d = %s, want the decision of --request %s", i+1, l, files[i])
				}
			}
		})
	}
	t.Run("bad input exits 2", func(t *testing.T) {
		run := exec.Command(binary, append(policyArgs, "--requests", "-")...)
		run.Stdin = strings.NewReader(compact[0] + "\n{\"attributes\": {\"nope\": 1}}\n")
		out, err := run.Output()
		var exit *exec.ExitError
		if !errors.As(err, &exit) || exit.ExitCode() != 2 || len(out) != 0 {
			t.Fatalf("exit %v, output %q; want exit 2 and no decisions", err, out)
		}
	})
}

func stderrOf(err error) string {
	var exit *exec.ExitError
	if errors.As(err, &exit) {
		return string(exit.Stderr)
	}
	return ""
}

// TestPolicyExplain runs `policy explain` on the shipped example requests:
// its decision is the one `policy check` prints, as text and as JSON, and
// bad input exits 2 with nothing on stdout, as `policy check` does.
func TestPolicyExplain(t *testing.T) {
	policies := []string{"--policies", "../../examples/policies"}
	files, err := filepath.Glob("../../examples/policies/requests/*.json")
	if err != nil || len(files) < 2 {
		t.Fatalf("example requests: %v %v", files, err)
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			out, err := exec.Command(binary, append(append([]string{"policy", "check"}, policies...), "--request", f)...).Output()
			if err != nil {
				t.Fatalf("policy check: %v: %s", err, stderrOf(err))
			}
			var want map[string]any
			if err := json.Unmarshal(out, &want); err != nil {
				t.Fatal(err)
			}
			out, err = exec.Command(binary, append(append([]string{"policy", "explain"}, policies...), "--request", f, "-o", "json")...).Output()
			if err != nil {
				t.Fatalf("policy explain -o json: %v: %s", err, stderrOf(err))
			}
			var ex struct {
				Decision map[string]any `json:"decision"`
				Policies []struct {
					Policy  string `json:"policy"`
					Decides bool   `json:"decides"`
				} `json:"policies"`
			}
			if err := json.Unmarshal(out, &ex); err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(ex.Decision, want) {
				t.Fatalf("explain decided %v, check %v", ex.Decision, want)
			}
			deciding := ""
			for _, p := range ex.Policies {
				if p.Decides {
					deciding = p.Policy
				}
			}
			if deciding == "" || deciding != want["policy"] {
				t.Errorf("the explanation marks %q as deciding, check names %v", deciding, want["policy"])
			}
			text, err := exec.Command(binary, append(append([]string{"policy", "explain"}, policies...), "--request", f)...).Output()
			if err != nil {
				t.Fatalf("policy explain: %v: %s", err, stderrOf(err))
			}
			if !strings.Contains(string(text), deciding+": matched rule") || !strings.Contains(string(text), "\nDecision:    ") {
				t.Errorf("text output does not show the deciding policy %s:\n%s", deciding, text)
			}
		})
	}
	bad := filepath.Join(t.TempDir(), "bad.json")
	if err := os.WriteFile(bad, []byte(`{"attributes": {"nope": 1}}`), 0o600); err != nil {
		t.Fatal(err)
	}
	for name, args := range map[string][]string{
		"a bad request":     append([]string{"--request", bad}, policies...),
		"a missing request": append([]string{"--request", bad + ".missing"}, policies...),
		"no --request":      policies,
		"no policies":       {"--request", files[0], "--policies", t.TempDir() + "/none"},
		"an unknown -o":     append([]string{"--request", files[0], "-o", "xml"}, policies...),
		"a bad redaction":   append([]string{"--request", files[0], "--log-redact-path", "("}, policies...),
	} {
		t.Run(name+" exits 2", func(t *testing.T) {
			out, err := exec.Command(binary, append([]string{"policy", "explain"}, args...)...).Output()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 2 || len(out) != 0 {
				t.Fatalf("exit %v, output %q; want exit 2 and no output", err, out)
			}
		})
	}
}

// TestPolicyUsageErrors holds every usage error of the policy commands to
// exit 2, as their flag errors do: cobra returns the errors of flag groups
// and positional arguments past the flag error hook.
func TestPolicyUsageErrors(t *testing.T) {
	policies := []string{"--policies", "../../examples/policies"}
	files, err := filepath.Glob("../../examples/policies/requests/*.json")
	if err != nil || len(files) < 1 {
		t.Fatalf("example requests: %v %v", files, err)
	}
	for name, args := range map[string][]string{
		"check without --request or --requests": append([]string{"check"}, policies...),
		"check with --request and --requests":   append([]string{"check", "--request", files[0], "--requests", files[0]}, policies...),
		"check with an argument":                append([]string{"check", "--request", files[0], "extra"}, policies...),
		"explain with an argument":              append([]string{"explain", "--request", files[0], "extra"}, policies...),
		"compile with an argument":              append([]string{"compile", "extra"}, policies...),
		"check with an unknown flag":            append([]string{"check", "--request", files[0], "--nope"}, policies...),
	} {
		t.Run(name, func(t *testing.T) {
			out, err := exec.Command(binary, append([]string{"policy"}, args...)...).Output()
			var exit *exec.ExitError
			if !errors.As(err, &exit) || exit.ExitCode() != 2 || len(out) != 0 {
				t.Fatalf("exit %v, output %q, stderr %q; want exit 2 and no output", err, out, stderrOf(err))
			}
		})
	}
}
