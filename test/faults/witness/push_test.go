package witness_test

import (
	"bufio"
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"database/sql"
	"encoding/base64"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// startWitness runs `trustmesh audit monitor --listen` as a long-running
// tlog-witness of the data directory's log, and returns its URL and its
// cosignature/v1 verifier key.
func startWitness(t *testing.T, wdir, dataDir string) (url, vkey string) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	cmd := exec.CommandContext(ctx, bin, "audit", "monitor", "--witness", wdir, "--name", "witness.test/push",
		"--from", dataDir, "--key", checkpointKey(t, dataDir), "--interval", "1h", "--listen", "127.0.0.1:0")
	cmd.Cancel = func() error { return cmd.Process.Signal(os.Interrupt) }
	var stderr lockedBuffer
	cmd.Stderr = &stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cancel()
		_ = cmd.Wait()
		if t.Failed() {
			t.Logf("audit monitor:\n%s", stderr.String())
		}
	})
	lines := make(chan string, 1)
	go func() {
		sc := bufio.NewScanner(out)
		for sc.Scan() {
			if addr, ok := strings.CutPrefix(sc.Text(), "serving /metrics and /add-checkpoint on "); ok {
				lines <- addr
			}
		}
		_, _ = io.Copy(io.Discard, out)
	}()
	select {
	case addr := <-lines:
		url = "http://" + addr
	case <-time.After(60 * time.Second):
		t.Fatalf("audit monitor did not listen:\n%s", stderr.String())
	}
	b, err := os.ReadFile(filepath.Join(wdir, "witness.pub"))
	if err != nil {
		t.Fatal(err)
	}
	return url, strings.TrimSpace(string(b))
}

// metric reads one sample of serve's /metrics ("" when absent).
func (p *serveProc) metric(t *testing.T, sample string) string {
	t.Helper()
	resp, err := http.Get("http://" + p.monitoring + "/metrics")
	if err != nil {
		return ""
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), sample+" "); ok {
			return v
		}
	}
	return ""
}

func waitFor(t *testing.T, what string, p *serveProc, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); !cond(); time.Sleep(50 * time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: timed out\n%s", what, p.stderr.String())
		}
	}
}

// TestServePushesToATlogWitness: the real serve, with --witness URL and
// --witness-key, pushes its checkpoints to `trustmesh audit monitor
// --listen` over C2SP tlog-witness, verifies the cosignature and keeps it
// in the data directory; restarted over a journal rewritten with the
// checkpoint key, it is refused by the witness, says so (log, metric
// reason "inconsistent") and keeps serving, and the kept cosignature
// still names the honest size, which `audit verify --checkpoint` then
// holds against the rewritten journal.
func TestServePushesToATlogWitness(t *testing.T) {
	data := filepath.Join(t.TempDir(), "data")
	p := startServe(t, data)
	grow(t, data, 3)
	p.stop(t)
	url, vkey := startWitness(t, t.TempDir(), data)
	witnessArgs := []string{"--witness", url, "--witness-key", vkey}
	cosigned := filepath.Join(data, journal.WitnessCosignedFile)
	key := checkpointKey(t, data)

	keptSize := func() uint64 {
		t.Helper()
		b, err := os.ReadFile(cosigned)
		if err != nil {
			return 0
		}
		cp, err := journal.ParseCheckpoint(b, key)
		if err != nil {
			t.Fatalf("the kept checkpoint: %v", err)
		}
		_, sigs, _ := bytes.Cut(b, []byte("\n\n"))
		lines := bytes.SplitAfter(bytes.TrimSuffix(sigs, []byte("\n")), []byte("\n"))
		if _, err := journal.VerifyCosignature(vkey, cp, lines[len(lines)-1]); err != nil {
			t.Fatalf("the kept cosignature: %v", err)
		}
		return cp.Size
	}

	// At start serve offers its latest checkpoint; the witness has it
	// already (pulled at its start): it cosigns it again.
	grow(t, data, 2)
	p = startServe(t, data, witnessArgs...)
	want := latestSize(t, data)
	// The file is kept, then its directory synced, and only then the
	// metric set: wait for the last of them.
	waitFor(t, "the first cosignature, kept and in the metric", p, func() bool {
		return keptSize() == want && p.metric(t, "trustmesh_journal_witness_cosigned_size") == strconv.FormatUint(want, 10)
	})
	p.stop(t)

	// Restarted over a grown journal: a proof from the witness's size.
	grow(t, data, 4)
	p = startServe(t, data, witnessArgs...)
	honest := latestSize(t, data)
	waitFor(t, "the cosignature after a restart", p, func() bool { return keptSize() == honest })
	p.stop(t)
	out, err := exec.Command(bin, "audit", "cosigned", "--data-dir", data, "--witness-key", vkey, "-o", "json").CombinedOutput()
	if err != nil || !strings.Contains(string(out), `"size": `+strconv.FormatUint(honest, 10)) {
		t.Errorf("audit cosigned: %v\n%s", err, out)
	}
	otherKey := otherWitnessKey(t)
	if err := exec.Command(bin, "audit", "cosigned", "--data-dir", data, "--witness-key", otherKey).Run(); exitCode(err) != 3 {
		t.Errorf("audit cosigned with another witness's key: %v, want exit 3", err)
	}

	// Rewritten with the checkpoint key: refused, visible, serving.
	rewrite(t, data, newAttacker(t, data))
	p = startServe(t, data, witnessArgs...)
	// The failure is counted, then logged: wait for both.
	waitFor(t, "the refusal, counted and logged", p, func() bool {
		return p.metric(t, `trustmesh_journal_witness_failures_total{reason="inconsistent"}`) == "1" &&
			strings.Contains(p.stderr.String(), "reason=inconsistent")
	})
	if resp, err := http.Get("http://" + p.monitoring + "/readyz"); err != nil || resp.StatusCode != http.StatusOK {
		t.Errorf("serve is not ready after the witness refused it: %v", err)
	} else {
		resp.Body.Close()
	}
	if got := keptSize(); got != honest {
		t.Errorf("the kept cosigned size is %d, want the honest %d", got, honest)
	}
	p.stop(t)
	out, err = exec.Command(bin, "audit", "verify", "--data-dir", data, "--key", key, "--checkpoint", cosigned).CombinedOutput()
	if err == nil {
		t.Errorf("audit verify passes the rewritten journal against the witness's cosigned checkpoint:\n%s", out)
	}
}

// latestSize is the size of the data directory's latest checkpoint.
func latestSize(t *testing.T, dataDir string) uint64 {
	t.Helper()
	db, err := sql.Open("sqlite", "file:"+filepath.Join(dataDir, "journal.db")+"?mode=ro")
	if err != nil {
		t.Fatal(err)
	}
	defer db.Close()
	var n int64
	if err := db.QueryRow(`SELECT MAX(size) FROM checkpoints`).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return uint64(n)
}

// otherWitnessKey is the verifier key of a witness other than the one
// serve pushes to.
func otherWitnessKey(t *testing.T) string {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	keyData := append([]byte{journal.AlgCosignatureV1}, priv.Public().(ed25519.PublicKey)...)
	const name = "witness.test/push"
	return fmt.Sprintf("%s+%08x+%s", name, journal.NoteKeyHash(name, keyData), base64.StdEncoding.EncodeToString(keyData))
}

func exitCode(err error) int {
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return ee.ExitCode()
	}
	if err != nil {
		return -1
	}
	return 0
}
