package postgres_test

import (
	"database/sql"
	"encoding/base64"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	_ "github.com/jackc/pgx/v5/stdlib"
	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
)

// TestReplicaKilledDuringCommits runs two `trustmesh serve` replicas on one
// PostgreSQL journal, both issuing, and SIGKILLs one in the middle of its
// commits. The log has no gap and no fork, every entry is under a signed
// checkpoint (a batch is one transaction: the killed replica's in-flight
// commit is there whole or not at all), every certificate either replica
// handed out is journalled, and the survivor's longest pause in issuing is
// at most 5 s.
func TestReplicaKilledDuringCommits(t *testing.T) {
	pg := startPostgres(t)
	shared := newSharedCA(t)
	dirA, dirB := t.TempDir(), t.TempDir()
	a := startServe(t, append(shared.journalFlags(dirA, pg.dsn), "--cacerts", shared.cacerts)...)
	b := startServe(t, append(shared.journalFlags(dirB, pg.dsn), "--cacerts", shared.cacerts)...)
	wsA := enrol(t, 3, a.ca, shared.roots, shared.journalFlags(dirA, pg.dsn))
	wsB := enrol(t, 3, b.ca, shared.roots, shared.journalFlags(dirB, pg.dsn))

	stop := make(chan struct{})
	outA, outB := make(chan outcome, 1<<16), make(chan outcome, 1<<16)
	wgA := burst(a.ca, shared.roots, wsA, stop, outA)
	wgB := burst(b.ca, shared.roots, wsB, stop, outB)
	var gotA, gotB []outcome
	okCount := func(os []outcome) (n int) {
		for _, o := range os {
			if o.err == nil {
				n++
			}
		}
		return n
	}
	drain := func(until func() bool, max time.Duration) {
		deadline := time.After(max)
		for !until() {
			select {
			case o := <-outA:
				gotA = append(gotA, o)
			case o := <-outB:
				gotB = append(gotB, o)
			case <-deadline:
				return
			}
		}
	}
	drain(func() bool { return okCount(gotA) >= 40 && okCount(gotB) >= 40 }, 40*time.Second)
	if okCount(gotA) < 40 || okCount(gotB) < 40 {
		t.Fatalf("before the kill: %d and %d renewals; want 40 on each", okCount(gotA), okCount(gotB))
	}
	killed := time.Now()
	if err := a.cmd.Process.Signal(syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	_ = a.cmd.Wait()
	drain(func() bool { return time.Since(killed) > 6*time.Second }, 10*time.Second)
	close(stop)
	wgA.Wait()
	wgB.Wait()
	close(outA)
	close(outB)
	for o := range outA {
		gotA = append(gotA, o)
	}
	for o := range outB {
		gotB = append(gotB, o)
	}

	for _, o := range append(append([]outcome{}, gotA...), gotB...) {
		if o.err != nil && o.at.Before(killed) {
			t.Errorf("with both replicas up an issuance failed: %v", o.err)
		}
	}
	// The survivor: no failure, and its longest pause across the kill.
	var last time.Time
	var gap time.Duration
	for _, o := range gotB {
		if o.err != nil {
			t.Errorf("the surviving replica refused an issuance: %v", o.err)
			continue
		}
		if !last.IsZero() && o.at.After(killed.Add(-time.Second)) && o.at.Sub(last) > gap {
			gap = o.at.Sub(last)
		}
		last = o.at
	}
	if gap > 5*time.Second {
		t.Errorf("the surviving replica paused issuing for %s; want at most 5 s", gap)
	}
	if okCount(gotB) == 0 || last.Before(killed.Add(5*time.Second)) {
		t.Errorf("the surviving replica's last issuance was %s after the kill", last.Sub(killed))
	}
	b.stop(t)

	entries, checkpoints := checkLogShape(t, pg.dsn, filepath.Join(dirB, "checkpoint.pub"))
	checkJournal(t, pg.dsn, dirB, shared, append(gotA, gotB...))
	t.Logf("replica A killed with %d certificates handed out, B %d; B's longest pause across the kill %s; the log: %d entries under %d checkpoints, no gap, no fork",
		okCount(gotA), okCount(gotB), gap.Round(time.Millisecond), entries, checkpoints)
}

// checkLogShape reads the journal's tables directly: the entries are
// numbered 0..n-1 with no gap, every checkpoint is validly signed, the
// sizes grow strictly, each signed root is the Merkle root of the first
// size entries as stored (one history, no fork), and the latest checkpoint
// covers every entry (no entry of a half-written batch lies beyond it).
func checkLogShape(t *testing.T, dsn, pubPath string) (entries, checkpoints int) {
	t.Helper()
	pub, err := os.ReadFile(pubPath)
	if err != nil {
		t.Fatal(err)
	}
	v, err := note.NewVerifier(strings.TrimSpace(string(pub)))
	if err != nil {
		t.Fatal(err)
	}
	db, err := sql.Open("pgx", dsn)
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()

	roots := map[int64][]byte{}
	rows, err := db.Query(`SELECT size, note FROM checkpoints ORDER BY size`)
	if err != nil {
		t.Fatal(err)
	}
	var prev int64 = -1
	for rows.Next() {
		var size int64
		var signed []byte
		if err := rows.Scan(&size, &signed); err != nil {
			t.Fatal(err)
		}
		n, err := note.Open(signed, note.VerifierList(v))
		if err != nil {
			t.Fatalf("checkpoint at size %d: %v", size, err)
		}
		lines := strings.Split(n.Text, "\n")
		if len(lines) < 3 || lines[1] != strconv.FormatInt(size, 10) {
			t.Fatalf("checkpoint at size %d signs %q", size, n.Text)
		}
		root, err := base64.StdEncoding.DecodeString(lines[2])
		if err != nil {
			t.Fatal(err)
		}
		if size <= prev {
			t.Fatalf("checkpoint sizes do not grow: %d after %d", size, prev)
		}
		prev = size
		roots[size] = root
		checkpoints++
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	rows.Close()

	rf := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
	rng := rf.NewEmptyRange(0)
	rows, err = db.Query(`SELECT idx, body FROM entries ORDER BY idx`)
	if err != nil {
		t.Fatal(err)
	}
	defer rows.Close()
	for rows.Next() {
		var idx int64
		var body []byte
		if err := rows.Scan(&idx, &body); err != nil {
			t.Fatal(err)
		}
		if idx != int64(entries) {
			t.Fatalf("the log has a gap: entry %d follows %d", idx, entries-1)
		}
		if err := rng.Append(rfc6962.DefaultHasher.HashLeaf(body), nil); err != nil {
			t.Fatal(err)
		}
		entries++
		if want, ok := roots[int64(entries)]; ok {
			got, err := rng.GetRootHash(nil)
			if err != nil {
				t.Fatal(err)
			}
			if string(got) != string(want) {
				t.Fatalf("the log forks: the checkpoint at size %d signs a root the stored entries do not give", entries)
			}
			delete(roots, int64(entries))
		}
	}
	if err := rows.Err(); err != nil {
		t.Fatal(err)
	}
	if len(roots) != 0 {
		t.Fatalf("%d checkpoints are beyond the stored entries", len(roots))
	}
	if prev != int64(entries) {
		t.Fatalf("the latest checkpoint covers %d entries, the log holds %d: a batch was written in part", prev, entries)
	}
	return entries, checkpoints
}
