package rotation

import (
	"bytes"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/internal/serial"
)

// rotationRecords counts the journal's rotation records by detail ("prepare
// intermediate", "activate intermediate", "taint intermediate", ...) and the
// serial they name, as `audit log` prints them.
func rotationRecords(t *testing.T, dataDir string) map[string]int {
	t.Helper()
	re := regexp.MustCompile(`\srotation\s+([0-9a-f]+)\s+((?:prepare|activate|taint|retire) (?:intermediate|root))`)
	out := map[string]int{}
	for _, l := range strings.Split(cli(t, "audit", "log", "--data-dir", dataDir), "\n") {
		if m := re.FindStringSubmatch(l); m != nil {
			out[m[2]+" "+m[1]]++
		}
	}
	return out
}

// intermediateOf returns the serial of generation gen's intermediate, in
// the spelling of the journal's rotation records (no leading zeros).
func intermediateOf(t *testing.T, dataDir string, gen int) string {
	t.Helper()
	raw, err := os.ReadFile(filepath.Join(dataDir, "ca", fmt.Sprintf("gen-%d", gen), "ca-cert.pem"))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := pem.Decode(raw)
	if b == nil {
		t.Fatalf("generation %d: no PEM certificate", gen)
	}
	c, err := x509.ParseCertificate(b.Bytes)
	if err != nil {
		t.Fatal(err)
	}
	return serial.Format(c.SerialNumber)
}

// generations counts the CA generations in the data directory.
func generations(t *testing.T, dataDir string) int {
	t.Helper()
	gens, err := filepath.Glob(filepath.Join(dataDir, "ca", "gen-*"))
	if err != nil {
		t.Fatal(err)
	}
	return len(gens)
}

// killAtStep runs `ca rotate args` and SIGKILLs it, and serve with it, the
// moment rotation.json changes: after the step's state write, before or
// while it journals the step. It reports whether the journal already held
// the step when the processes died.
func killAtStep(t *testing.T, s *serve, args ...string) {
	t.Helper()
	stateFile := filepath.Join(s.dataDir, "ca", "rotation.json")
	before, err := os.ReadFile(stateFile)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, append([]string{"ca", "rotate", "--data-dir", s.dataDir}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	deadline := time.Now().Add(60 * time.Second)
	for {
		now, err := os.ReadFile(stateFile)
		if err == nil && !bytes.Equal(now, before) {
			_ = cmd.Process.Kill()
			s.kill()
			break
		}
		select {
		case err := <-done:
			if now, rerr := os.ReadFile(stateFile); rerr == nil && !bytes.Equal(now, before) && err == nil {
				// The step ran to its end between two reads: serve is
				// still killed while it takes the new state in.
				s.kill()
				t.Logf("ca rotate %s: finished before the kill; serve killed after it", strings.Join(args, " "))
				return
			}
			t.Fatalf("ca rotate %s ended (%v) without changing the rotation state:\n%s", strings.Join(args, " "), err, stderr.String())
		default:
		}
		if time.Now().After(deadline) {
			_ = cmd.Process.Kill()
			t.Fatalf("ca rotate %s did not change the rotation state within a minute", strings.Join(args, " "))
		}
	}
	err = <-done
	t.Logf("ca rotate %s: killed right after its state write (exit: %v)", strings.Join(args, " "), err)
}

// TestSIGKILLDuringARotationStep kills the process taking each manual
// rotation step (prepare, activate, taint) the instant its state write
// lands, and serve with it; then restarts serve. The journal must then hold
// every step the state shows, exactly once, and nothing the state does not:
// no second new generation, none lost.
func TestSIGKILLDuringARotationStep(t *testing.T) {
	if testing.Short() {
		t.Skip("runs trustmesh serve")
	}
	dir := tempDir(t, "faults-rotation-kill-")
	s := startServe(t, filepath.Join(dir, "data"))
	first := status(t, s.dataDir)
	gen1 := first.serialOf("intermediate", "active")

	type want struct {
		gens    int
		records func(st rotationStatus) []string
	}
	steps := []struct {
		args []string
		want want
	}{
		{[]string{"--prepare"}, want{2, func(st rotationStatus) []string {
			return []string{"prepare intermediate " + intermediateOf(t, s.dataDir, st.Next)}
		}}},
		{[]string{"--activate"}, want{2, func(st rotationStatus) []string {
			a := st.serialOf("intermediate", "active")
			return []string{"prepare intermediate " + a, "activate intermediate " + a}
		}}},
		{[]string{"--taint"}, want{3, func(st rotationStatus) []string {
			a := st.serialOf("intermediate", "active")
			return []string{"taint intermediate " + st.Tainted[0].Serial, "prepare intermediate " + a, "activate intermediate " + a}
		}}},
	}
	for _, step := range steps {
		name := strings.Join(step.args, " ")
		killAtStep(t, s, step.args...)
		t.Logf("journal at the kill: %v", rotationRecords(t, s.dataDir))
		s.restart(t)
		st := status(t, s.dataDir)
		wanted := step.want.records(st)
		// serve's first rotation checks (every second) record what the
		// state shows and the journal lacks.
		var got map[string]int
		deadline := time.Now().Add(20 * time.Second)
		for {
			got = rotationRecords(t, s.dataDir)
			missing := 0
			for _, w := range wanted {
				if got[w] == 0 {
					missing++
				}
			}
			if missing == 0 || time.Now().After(deadline) {
				break
			}
			time.Sleep(200 * time.Millisecond)
		}
		time.Sleep(2 * time.Second) // two more checks: they must add nothing
		got = rotationRecords(t, s.dataDir)
		for _, w := range wanted {
			if got[w] != 1 {
				t.Errorf("after SIGKILL during %s and a restart: journal holds %q %d times, want once (journal: %v)", name, w, got[w], got)
			}
		}
		for rec, n := range got {
			// "activate root" is journalled at every activation under
			// that root; each intermediate's steps happen once.
			if n != 1 && strings.Contains(rec, "intermediate") {
				t.Errorf("after SIGKILL during %s: %q journalled %d times", name, rec, n)
			}
		}
		if g := generations(t, s.dataDir); g != step.want.gens {
			t.Errorf("after SIGKILL during %s: %d generations, want %d", name, g, step.want.gens)
		}
		if st2 := status(t, s.dataDir); fmt.Sprint(st2) != fmt.Sprint(st) {
			t.Errorf("after SIGKILL during %s: serve changed the rotation state on restart:\n%+v\nthen\n%+v", name, st, st2)
		}
	}
	if got := rotationRecords(t, s.dataDir); got["prepare intermediate "+gen1] != 0 || got["activate intermediate "+gen1] != 0 {
		t.Errorf("the first intermediate %s, created at start, has rotation records: %v", gen1, got)
	}
}
