package main

import (
	"encoding/json"
	"errors"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestCheckCommand runs trustmesh check against a served data directory:
// healthy, it exits 0 and prints a table; -o json carries every finding
// with its code and severity; a warning exits 3 only at --fail-on warning;
// a missing data directory exits 3; bad flags exit 2.
func TestCheckCommand(t *testing.T) {
	dataDir := filepath.Join(t.TempDir(), "data")
	srv := startServe(t, dataDir)
	base := []string{"check", "--data-dir", dataDir, "--monitoring", srv.monitoring}

	out := run(t, base...)
	for _, want := range []string{"TM-CA-002", "TM-JNL-002", "TM-CP-001", "0 error(s), 0 warning(s)"} {
		if !strings.Contains(out, want) {
			t.Errorf("check table lacks %q:\n%s", want, out)
		}
	}
	var rep struct {
		Findings []struct{ Code, Severity, Hint string }
	}
	if err := json.Unmarshal([]byte(run(t, append(base, "-o", "json")...)), &rep); err != nil {
		t.Fatal(err)
	}
	codes := map[string]string{}
	for _, f := range rep.Findings {
		codes[f.Code] = f.Severity
	}
	if codes["TM-CP-001"] != "ok" || codes["TM-JNL-002"] != "ok" || codes["TM-CA-003"] != "ok" {
		t.Errorf("check -o json findings: %v", codes)
	}

	// The intermediate lives a year by default: within 400 days is a
	// warning, which fails the check only at --fail-on warning.
	run(t, append(base, "--min-validity", "400d")...)
	exitCode(t, 3, append(base, "--min-validity", "400d", "--fail-on", "warning")...)
	exitCode(t, 3, "check", "--data-dir", filepath.Join(t.TempDir(), "missing"))
	exitCode(t, 2, append(base, "-o", "xml")...)
	exitCode(t, 2, append(base, "--fail-on", "critical")...)
	exitCode(t, 2, append(base, "--min-validity", "thirty")...)
}

func exitCode(t *testing.T, want int, args ...string) {
	t.Helper()
	err := exec.Command(binary, args...).Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != want {
		t.Errorf("trustmesh %s: %v, want exit %d", strings.Join(args, " "), err, want)
	}
}
