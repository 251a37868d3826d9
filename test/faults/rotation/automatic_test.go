package rotation

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// fastRotation makes serve rotate its intermediate on its own every dozen
// seconds: a self-managed intermediate must be replaced the maximum
// workload TTL (1m) plus the CA backdate (5m) before it ends, so one of
// 6m14s is prepared 12s after its creation and activated a check (1s)
// later. Roots propagate for 1s.
var fastRotation = []string{"--ca-intermediate-ttl", "6m14s", "--ca-root-propagation", "1s",
	"--max-workload-ttl", "1m", "--min-workload-ttl", "1m", "--default-workload-ttl", "1m"}

// diskState is the part of ca/rotation.json the kill trigger reads: it must
// decide within a millisecond of the write which step it was.
type diskState struct {
	Active         int `json:"active"`
	Next           int `json:"next"`
	LastGeneration int `json:"last_generation"`
	Tainted        []struct {
		Role string `json:"role"`
	} `json:"tainted"`
}

func readState(t *testing.T, dataDir string) (diskState, []byte) {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dataDir, "ca", "rotation.json"))
	if err != nil {
		t.Fatal(err)
	}
	var st diskState
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatalf("rotation.json: %v\n%s", err, b)
	}
	return st, b
}

// killServeAtWrite SIGKILLs serve the moment it writes a rotation state
// for which step(before, after) holds, and returns both states. Only serve
// runs: the write is serve's own, taken on its schedule.
func killServeAtWrite(t *testing.T, s *serve, within time.Duration, what string, step func(before, after diskState) bool) (diskState, diskState) {
	t.Helper()
	before, raw := readState(t, s.dataDir)
	path := filepath.Join(s.dataDir, "ca", "rotation.json")
	deadline := time.Now().Add(within)
	for {
		b, err := os.ReadFile(path)
		if err == nil && !bytes.Equal(b, raw) {
			var after diskState
			if json.Unmarshal(b, &after) == nil && step(before, after) {
				s.kill()
				t.Logf("%s: serve SIGKILLed at its state write (generation %d active, %d prepared, %d tainted)",
					what, after.Active, after.Next, len(after.Tainted))
				return before, after
			}
			before, raw = after, b
		}
		if s.exited() {
			t.Fatalf("%s: serve exited: %v\n%s", what, s.err, s.stderr.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: serve did not take the step within %s", what, within)
		}
		time.Sleep(time.Millisecond)
	}
}

// checkJournalAgrees waits for serve's first rotation checks after a
// restart and asserts that the journal and the state agree: every
// generation prepared since the first is journalled as prepared exactly
// once, every one activated as activated exactly once, the prepared one
// not as activated, every taint once, and no intermediate step twice.
// The data directory holds exactly the generations the state names.
func checkJournalAgrees(t *testing.T, s *serve, what string) map[string]int {
	t.Helper()
	var got map[string]int
	var missing []string
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, _ := readState(t, s.dataDir)
		got = rotationRecords(t, s.dataDir)
		missing = missing[:0]
		for g := 2; g <= st.LastGeneration; g++ {
			serial := intermediateOf(t, s.dataDir, g)
			if got["prepare intermediate "+serial] == 0 {
				missing = append(missing, fmt.Sprintf("prepare of generation %d", g))
			}
			if g <= st.Active && got["activate intermediate "+serial] == 0 {
				missing = append(missing, fmt.Sprintf("activate of generation %d", g))
			}
		}
		if len(missing) == 0 || time.Now().After(deadline) {
			break
		}
		time.Sleep(200 * time.Millisecond)
	}
	if len(missing) > 0 {
		t.Errorf("%s: 20s after the restart the journal still lacks %v (journal: %v)", what, missing, got)
	}
	st, _ := readState(t, s.dataDir)
	if g := generations(t, s.dataDir); g != st.LastGeneration {
		t.Errorf("%s: %d generations on disk, the state names %d", what, g, st.LastGeneration)
	}
	if st.Next != 0 && got["activate intermediate "+intermediateOf(t, s.dataDir, st.Next)] != 0 {
		t.Errorf("%s: the prepared generation %d is journalled as activated", what, st.Next)
	}
	for rec, n := range got {
		// "activate root" is journalled at every activation under that
		// root; each intermediate's steps happen once.
		if n != 1 && strings.Contains(rec, "intermediate") {
			t.Errorf("%s: %q journalled %d times", what, rec, n)
		}
	}
	if out := cli(t, "audit", "verify", "--data-dir", s.dataDir); !strings.Contains(out, "OK") {
		t.Errorf("%s: audit verify:\n%s", what, out)
	}
	return got
}

// TestSIGKILLDuringAnAutomaticRotationStep kills serve at the instant it
// writes the state of a step it takes on its own schedule, no `ca rotate`
// running: preparing the next intermediate, activating it, and retiring a
// tainted one once nothing valid chains to it (killed once at the state
// write and once at the journal append, which comes first for a
// retirement). After each restart the
// journal and the state agree, each step journalled exactly once, and
// rotation resumes where it stopped: the prepared generation is the one
// activated next, a retired certificate stays retired, and the schedule
// goes on with the next generation.
func TestSIGKILLDuringAnAutomaticRotationStep(t *testing.T) {
	if testing.Short() {
		t.Skip("runs trustmesh serve")
	}
	dir := tempDir(t, "faults-rotation-auto-")
	s := startServe(t, filepath.Join(dir, "data"), fastRotation...)

	// Prepare: the state names a prepared generation it did not.
	_, at := killServeAtWrite(t, s, 60*time.Second, "prepare", func(b, a diskState) bool { return a.Next != 0 && b.Next == 0 })
	prepared := at.Next
	t.Logf("journal at the kill: %v", rotationRecords(t, s.dataDir))
	s.restart(t)
	checkJournalAgrees(t, s, "SIGKILL during prepare")
	// Resumes: the generation prepared before the kill is the one
	// activated, no other prepared over it.
	eventually(t, 30*time.Second, "serve activating the generation prepared before the kill", func() bool {
		st, _ := readState(t, s.dataDir)
		if st.Active > prepared || (st.Next != 0 && st.Next != prepared) {
			t.Fatalf("after the kill during prepare: state %+v; generation %d should have been activated next", st, prepared)
		}
		return st.Active == prepared
	})

	// Activate: the active generation changes to the prepared one.
	_, at = killServeAtWrite(t, s, 60*time.Second, "activate", func(b, a diskState) bool { return a.Active != b.Active })
	activated := at.Active
	t.Logf("journal at the kill: %v", rotationRecords(t, s.dataDir))
	s.restart(t)
	checkJournalAgrees(t, s, "SIGKILL during activate")
	if st, _ := readState(t, s.dataDir); st.Active != activated {
		t.Fatalf("after the kill during activate: generation %d active, want %d", st.Active, activated)
	}

	// Retire: taint the intermediate serve has just activated, which has
	// signed nothing, so that serve retires it two checks later.
	st, _ := killNothingUntil(t, s, func(a diskState) bool { return a.Active > activated })
	taintedSerial := intermediateOf(t, s.dataDir, st.Active)
	cli(t, "ca", "rotate", "--taint", "--data-dir", s.dataDir)
	if after, _ := readState(t, s.dataDir); len(after.Tainted) != 1 {
		t.Fatalf("after ca rotate --taint: %d tainted, want 1", len(after.Tainted))
	}
	killServeAtWrite(t, s, 60*time.Second, "retire", func(b, a diskState) bool { return len(a.Tainted) < len(b.Tainted) })
	t.Logf("journal at the kill: %v", rotationRecords(t, s.dataDir))
	s.restart(t)
	got := checkJournalAgrees(t, s, "SIGKILL during retire")
	for _, rec := range []string{"taint intermediate ", "retire intermediate "} {
		if got[rec+taintedSerial] != 1 {
			t.Errorf("after SIGKILL during retire: %q journalled %d times, want once (journal: %v)", rec+taintedSerial, got[rec+taintedSerial], got)
		}
	}
	last, _ := readState(t, s.dataDir)
	if len(last.Tainted) != 0 {
		t.Errorf("after SIGKILL during retire: the state still holds %d tainted certificates", len(last.Tainted))
	}

	// Retire again, killed this time the moment the journal grows: a
	// retirement is journalled before its state is written, so this lands
	// between the two, where the restarted serve must retire it without a
	// second record.
	st, _ = killNothingUntil(t, s, func(a diskState) bool { return a.Active > last.Active })
	taintedSerial = intermediateOf(t, s.dataDir, st.Active)
	cli(t, "ca", "rotate", "--taint", "--data-dir", s.dataDir)
	killServeAtJournalAppend(t, s, 60*time.Second, "retire (journal first)")
	if at, _ := readState(t, s.dataDir); len(at.Tainted) == 1 {
		t.Logf("retire (journal first): killed after the journal append, before the state write: the journal holds %q %d time(s), the state still holds it tainted",
			"retire intermediate "+taintedSerial, rotationRecords(t, s.dataDir)["retire intermediate "+taintedSerial])
	} else {
		t.Logf("retire (journal first): the state write landed before the kill")
	}
	s.restart(t)
	eventually(t, 20*time.Second, "the restarted serve finishing the retirement", func() bool {
		st, _ := readState(t, s.dataDir)
		return len(st.Tainted) == 0
	})
	got = checkJournalAgrees(t, s, "SIGKILL during retire, after its journal append")
	for _, rec := range []string{"taint intermediate ", "retire intermediate "} {
		if got[rec+taintedSerial] != 1 {
			t.Errorf("after SIGKILL during retire (journal first): %q journalled %d times, want once (journal: %v)", rec+taintedSerial, got[rec+taintedSerial], got)
		}
	}
	last, _ = readState(t, s.dataDir)

	// The schedule goes on: serve prepares and activates the next
	// generation, and the journal still agrees.
	killNothingUntil(t, s, func(a diskState) bool { return a.Active > last.Active })
	checkJournalAgrees(t, s, "the next rotation after the kills")
	if st, _ := readState(t, s.dataDir); len(st.Tainted) != 0 {
		t.Errorf("the retired certificate came back: %+v", st)
	}
}

// killServeAtJournalAppend SIGKILLs serve the moment its journal's files
// change (an append, since nothing else writes to the journal meanwhile).
func killServeAtJournalAppend(t *testing.T, s *serve, within time.Duration, what string) {
	t.Helper()
	files := []string{filepath.Join(s.dataDir, "journal.db"), filepath.Join(s.dataDir, "journal.db-wal")}
	stamp := func() string {
		var b strings.Builder
		for _, f := range files {
			if fi, err := os.Stat(f); err == nil {
				fmt.Fprintf(&b, "%d@%d ", fi.Size(), fi.ModTime().UnixNano())
			}
		}
		return b.String()
	}
	before := stamp()
	deadline := time.Now().Add(within)
	for stamp() == before {
		if s.exited() {
			t.Fatalf("%s: serve exited: %v\n%s", what, s.err, s.stderr.String())
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: serve did not write its journal within %s", what, within)
		}
		time.Sleep(time.Millisecond)
	}
	s.kill()
	t.Logf("%s: serve SIGKILLed at its journal append", what)
}

// killNothingUntil waits, killing nothing, until serve writes a state for
// which cond holds.
func killNothingUntil(t *testing.T, s *serve, cond func(diskState) bool) (diskState, []byte) {
	t.Helper()
	var st diskState
	var raw []byte
	eventually(t, 60*time.Second, "serve's next scheduled rotation", func() bool {
		if s.exited() {
			t.Fatalf("serve exited: %v\n%s", s.err, s.stderr.String())
		}
		st, raw = readState(t, s.dataDir)
		return cond(st)
	})
	return st, raw
}
