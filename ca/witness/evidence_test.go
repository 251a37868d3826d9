package witness

import (
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// Anyone who can reach /add-checkpoint can replay the log's public, validly
// signed old checkpoints. Each is refused, but the evidence kept of them is
// bounded: a checkpoint already kept is not written again, whatever the
// clock says, and no more than maxEvidence are kept per log.
func TestReplayedCheckpointsKeepBoundedEvidence(t *testing.T) {
	k := newLogKey(t)
	dir := t.TempDir()
	now := epoch
	w, err := Open(dir, "witness.test/one", func() time.Time { now = now.Add(time.Second); return now })
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	if _, err := w.AddLog("", k.vkey); err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(Handler(w))
	defer srv.Close()
	const n = maxEvidence + 60
	tr := newTree(n+1, nil)
	if _, err := w.Add(tr.checkpoint(t, k, n), 0, nil); err != nil {
		t.Fatal(err)
	}
	replay := func(size uint64) {
		body := journal.AddCheckpointBody(n+1000, nil, tr.checkpoint(t, k, size))
		resp, err := http.Post(srv.URL+AddCheckpointPath, "text/plain", strings.NewReader(string(body)))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusOK {
			t.Fatalf("an old checkpoint of size %d was cosigned", size)
		}
	}
	refused := filepath.Join(dir, "logs", "*", "refused", "*")
	for range 5 {
		replay(1)
	}
	if files, _ := filepath.Glob(refused); len(files) > 1 {
		t.Errorf("one checkpoint replayed 5 times, a second apart, left %d evidence files", len(files))
	}
	for size := uint64(2); size < n; size++ {
		replay(size)
	}
	if files, _ := filepath.Glob(refused); len(files) > maxEvidence {
		t.Errorf("replays of %d old checkpoints left %d evidence files, want at most %d", n-1, len(files), maxEvidence)
	}
}
