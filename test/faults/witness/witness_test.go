// Package witness_test attacks the journal's history end to end: it runs
// the real trustmesh serve, lets `trustmesh audit monitor` witness its
// journal, then shows the witness checkpoints forged with the journal's own
// checkpoint key (a fork of the same size, a fork of a larger size, a split
// view, a rollback), from a URL source and from a data directory source,
// and asserts that each is refused, reported and kept as evidence.
package witness_test

import (
	"bytes"
	"context"
	"database/sql"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/transparency-dev/merkle/compact"
	"github.com/transparency-dev/merkle/rfc6962"
	"golang.org/x/mod/sumdb/note"
	_ "modernc.org/sqlite"

	"github.com/trustmesh/trustmesh/ca/authority"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/witness"
	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/test/internal/binary"
)

var bin string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "faults-witness-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	if bin, err = binary.BuildTrustmesh(dir, "FAULTS_TRUSTMESH"); err != nil {
		os.RemoveAll(dir)
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}

type serveProc struct {
	cmd        *exec.Cmd
	monitoring string
	stderr     lockedBuffer
}

// startServe runs `trustmesh serve` on dataDir and waits until it is ready.
func startServe(t *testing.T, dataDir string, extra ...string) *serveProc {
	t.Helper()
	p := &serveProc{monitoring: freeport.Addr(t)}
	p.cmd = exec.Command(bin, append([]string{"serve", "--data-dir", dataDir, "--listen-ca", freeport.Addr(t), "--listen-monitoring", p.monitoring,
		"--listen-bundle", "", "--listen-ui", "off", "--kubernetes", "off", "--decision-log", ""}, extra...)...)
	p.cmd.Stderr = &p.stderr
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = p.cmd.Process.Kill(); _ = p.cmd.Wait() })
	deadline := time.Now().Add(45 * time.Second)
	for {
		resp, err := http.Get("http://" + p.monitoring + "/readyz")
		if err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return p
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("trustmesh serve did not become ready:\n%s", p.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func (p *serveProc) url() string { return "http://" + p.monitoring + "/journal" }

func (p *serveProc) stop(t *testing.T) {
	t.Helper()
	if err := p.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if err := p.cmd.Wait(); err != nil {
		t.Fatalf("trustmesh serve exited with %v:\n%s", err, p.stderr.String())
	}
}

// grow appends n join-token creations to the journal of dataDir.
func grow(t *testing.T, dataDir string, n int) {
	t.Helper()
	for i := range n {
		id := fmt.Sprintf("spiffe://cluster.local/ns/witness/sa/w%d-%d", time.Now().UnixNano(), i)
		if out, err := exec.Command(bin, "ca", "token", "create", "--data-dir", dataDir, "--spiffe-id", id).CombinedOutput(); err != nil {
			t.Fatalf("ca token create: %v\n%s", err, out)
		}
	}
}

type monitorResult struct {
	code   int
	report witness.Report
	stderr string
}

// monitor runs `trustmesh audit monitor -o json` once.
func monitor(t *testing.T, args ...string) monitorResult {
	t.Helper()
	var stdout, stderr bytes.Buffer
	cmd := exec.Command(bin, append([]string{"audit", "monitor", "-o", "json"}, args...)...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := monitorResult{stderr: stderr.String()}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(stdout.Bytes(), &r.report); err != nil {
		t.Fatalf("audit monitor %v: exit %d, output %q: %v\n%s", args, r.code, stdout.String(), err, r.stderr)
	}
	return r
}

func (r monitorResult) finding(t *testing.T, kind string) witness.Finding {
	t.Helper()
	if r.code != 3 {
		t.Fatalf("exit %d, want 3 for a %s: %+v\n%s", r.code, kind, r.report, r.stderr)
	}
	for _, f := range r.report.Findings {
		if f.Kind == kind {
			for _, e := range f.Evidence {
				if _, err := os.Stat(e); err != nil {
					t.Fatalf("evidence of the %s: %v", kind, err)
				}
			}
			if len(f.Evidence) == 0 {
				t.Fatalf("no evidence kept of the %s", kind)
			}
			return f
		}
	}
	t.Fatalf("no %s among %+v", kind, r.report.Findings)
	return witness.Finding{}
}

// attacker holds the journal's checkpoint key, as whoever owns the data
// directory does.
type attacker struct {
	signer note.Signer
	origin string
}

func newAttacker(t *testing.T, dataDir string) attacker {
	t.Helper()
	uri, err := authority.SoftKMSURI(filepath.Join(dataDir, "checkpoint-key.pem"))
	if err != nil {
		t.Fatal(err)
	}
	key, err := authority.OpenSigner(context.Background(), uri)
	if err != nil {
		t.Fatal(err)
	}
	const origin = "trustmesh.journal/cluster.local"
	s, _, err := journal.NewCheckpointSigner(origin, key)
	if err != nil {
		t.Fatal(err)
	}
	return attacker{s, origin}
}

// tree returns the leaves of a made-up log of n entries, and signs a
// checkpoint of it with the journal's key.
func (a attacker) tree(t *testing.T, n uint64) (leaves [][]byte, signed []byte) {
	t.Helper()
	for i := range n {
		leaves = append(leaves, rfc6962.DefaultHasher.HashLeaf([]byte(fmt.Sprintf("forged entry %d", i))))
	}
	return leaves, a.sign(t, leaves)
}

func (a attacker) sign(t *testing.T, leaves [][]byte) []byte {
	t.Helper()
	f := compact.RangeFactory{Hash: rfc6962.DefaultHasher.HashChildren}
	r := f.NewEmptyRange(0)
	for _, l := range leaves {
		if err := r.Append(l, nil); err != nil {
			t.Fatal(err)
		}
	}
	root, err := r.GetRootHash(nil)
	if err != nil {
		t.Fatal(err)
	}
	signed, err := note.Sign(&note.Note{Text: journal.Checkpoint{Origin: a.origin, Size: uint64(len(leaves)), Root: root}.Text()}, a.signer)
	if err != nil {
		t.Fatal(err)
	}
	return signed
}

// serveForged serves a forged log at /journal the way serve does, with
// consistency proofs that are right for the forged tree.
func serveForged(t *testing.T, leaves [][]byte, signed []byte) string {
	t.Helper()
	mux := http.NewServeMux()
	mux.HandleFunc("GET /journal/checkpoint", func(w http.ResponseWriter, _ *http.Request) { _, _ = w.Write(signed) })
	mux.HandleFunc("GET /journal/consistency", func(w http.ResponseWriter, r *http.Request) {
		var old, size uint64
		fmt.Sscan(r.URL.Query().Get("old"), &old)
		fmt.Sscan(r.URL.Query().Get("new"), &size)
		p, err := journal.ConsistencyProof(leaves[:size], old)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		for _, h := range p {
			fmt.Fprintln(w, base64.StdEncoding.EncodeToString(h))
		}
	})
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	return srv.URL + "/journal"
}

func checkpointKey(t *testing.T, dataDir string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dataDir, "checkpoint.pub"))
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(string(b))
}

// TestForksFromAURLSourceAreCaught witnesses the running serve over its
// monitoring endpoint, then offers checkpoints forged with its checkpoint
// key.
func TestForksFromAURLSourceAreCaught(t *testing.T) {
	data, wdir := filepath.Join(t.TempDir(), "data"), filepath.Join(t.TempDir(), "witness")
	p := startServe(t, data)
	grow(t, data, 3)
	key := checkpointKey(t, data)

	r := monitor(t, "--witness", wdir, "--from", p.url(), "--key", key)
	if r.code != 0 || len(r.report.Findings) != 0 || r.report.Accepted == 0 {
		t.Fatalf("the honest log: exit %d %+v\n%s", r.code, r.report, r.stderr)
	}
	grow(t, data, 2)
	r = monitor(t, "--witness", wdir, "--from", p.url())
	if r.code != 0 || len(r.report.Findings) != 0 {
		t.Fatalf("the honest log, grown: exit %d %+v\n%s", r.code, r.report, r.stderr)
	}
	accepted := r.report.Accepted

	a := newAttacker(t, data)
	t.Run("same size", func(t *testing.T) {
		leaves, signed := a.tree(t, accepted)
		f := monitor(t, "--witness", wdir, "--from", serveForged(t, leaves, signed)).finding(t, witness.KindFork)
		if f.Size != accepted {
			t.Fatalf("fork at %d, want %d", f.Size, accepted)
		}
	})
	t.Run("larger size with its own proof", func(t *testing.T) {
		leaves, signed := a.tree(t, accepted+7)
		monitor(t, "--witness", wdir, "--from", serveForged(t, leaves, signed)).finding(t, witness.KindFork)
	})
	t.Run("rollback", func(t *testing.T) {
		leaves, signed := a.tree(t, accepted-1)
		monitor(t, "--witness", wdir, "--from", serveForged(t, leaves, signed)).finding(t, witness.KindRollback)
	})
	t.Run("split view", func(t *testing.T) {
		grow(t, data, 1)
		leaves, signed := a.tree(t, accepted+1)
		r := monitor(t, "--witness", wdir, "--from", p.url(), "--from", serveForged(t, leaves, signed))
		f := r.finding(t, witness.KindSplitView)
		if len(f.Sources) != 2 || len(f.Evidence) != 2 {
			t.Fatalf("split view %+v", f)
		}
		if r.report.Accepted != accepted {
			t.Fatalf("accepted %d during a split view, want %d", r.report.Accepted, accepted)
		}
	})
	// Nothing forged entered the history: the honest log goes on.
	r = monitor(t, "--witness", wdir, "--from", p.url())
	if r.code != 0 || r.report.Accepted != accepted+1 {
		t.Fatalf("the honest log after the attacks: exit %d %+v\n%s", r.code, r.report, r.stderr)
	}
	p.stop(t)
}

// TestForksInADataDirectoryAreCaught witnesses a data directory, then
// rolls it back to a copy and rewrites its journal with the checkpoint key.
func TestForksInADataDirectoryAreCaught(t *testing.T) {
	base := t.TempDir()
	data, backup, wdir := filepath.Join(base, "data"), filepath.Join(base, "backup"), filepath.Join(base, "witness")
	p := startServe(t, data)
	grow(t, data, 2)
	p.stop(t)
	if out, err := exec.Command("cp", "-a", data, backup).CombinedOutput(); err != nil {
		t.Fatalf("cp: %v %s", err, out)
	}
	grow(t, data, 3)
	key := checkpointKey(t, data)
	r := monitor(t, "--witness", wdir, "--from", data, "--key", key)
	if r.code != 0 || r.report.Accepted == 0 {
		t.Fatalf("the honest data directory: exit %d %+v\n%s", r.code, r.report, r.stderr)
	}
	accepted := r.report.Accepted

	t.Run("restored from an older copy", func(t *testing.T) {
		monitor(t, "--witness", wdir, "--from", backup).finding(t, witness.KindRollback)
	})
	t.Run("rewritten and re-signed", func(t *testing.T) {
		rewrite(t, data, newAttacker(t, data))
		f := monitor(t, "--witness", wdir, "--from", data).finding(t, witness.KindFork)
		if f.Size != accepted {
			t.Fatalf("fork at %d, want %d", f.Size, accepted)
		}
	})
}

// rewrite changes entry 1 of the data directory's journal and replaces
// every checkpoint with one signed over the rewritten log: what an
// attacker holding the database and the checkpoint key can do.
func rewrite(t *testing.T, dataDir string, a attacker) {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dataDir, "journal.db"))
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	forged := []byte(`{"kind":"forged"}`)
	if _, err := db.Exec(`UPDATE entries SET body = $1, leaf_hash = $2 WHERE idx = 1`, forged, rfc6962.DefaultHasher.HashLeaf(forged)); err != nil {
		t.Fatal(err)
	}
	rows, err := db.Query(`SELECT body FROM entries ORDER BY idx`)
	if err != nil {
		t.Fatal(err)
	}
	var leaves [][]byte
	for rows.Next() {
		var body []byte
		if err := rows.Scan(&body); err != nil {
			t.Fatal(err)
		}
		leaves = append(leaves, rfc6962.DefaultHasher.HashLeaf(body))
	}
	rows.Close()
	signed := a.sign(t, leaves)
	cp, err := journal.ParseCheckpoint(signed, checkpointKey(t, dataDir))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`DELETE FROM checkpoints`); err != nil {
		t.Fatal(err)
	}
	if _, err := db.Exec(`INSERT INTO checkpoints (size, root, note, time_ns) VALUES ($1, $2, $3, $4)`, int64(cp.Size), cp.Root, signed, time.Now().UnixNano()); err != nil {
		t.Fatal(err)
	}
}
