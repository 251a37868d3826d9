package controlplane_test

import (
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/ca/journal"
	"github.com/trustmesh/trustmesh/ca/witness"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/ui"
)

// TestUIJournalShowsWitnessCosignature: with a tlog-witness (a URL
// --witness and its --witness-key), the journal view says which size the
// witness cosigned and when, as the cosigned checkpoint serve keeps says.
func TestUIJournalShowsWitnessCosignature(t *testing.T) {
	w, err := witness.Open(t.TempDir(), "witness.example/ui", time.Now)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	dataDir := t.TempDir()
	// The witness learns the journal's key (created at start) on the first
	// checkpoint it is offered, as witnessctl add-log would beforehand.
	var once sync.Once
	h := witness.Handler(w)
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		once.Do(func() {
			vkey, err := admin.CheckpointKey(admin.DataDir(dataDir), "")
			if err != nil {
				t.Error(err)
				return
			}
			origin, _, _ := strings.Cut(vkey, "+")
			if _, err := w.AddLog(origin, vkey); err != nil {
				t.Error(err)
			}
		})
		h.ServeHTTP(rw, r)
	}))
	defer srv.Close()

	e := start(t, func(c *controlplane.Config) {
		c.DataDir = dataDir
		c.Listen.UI = "127.0.0.1:0"
		c.Journal.Witness = srv.URL
		c.Journal.WitnessKey = w.VerifierKey()
	})
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo")
	e.obtain(newClient(t), e.token(id, time.Minute), id) // a checkpoint to cosign

	var j ui.JournalView
	deadline := time.Now().Add(15 * time.Second)
	for uiGet(t, e, "/ui/api/journal", &j); !strings.Contains(j.Witness.State, "cosigned by the witness at size "+strconv.FormatUint(j.Checkpoint.Size, 10)+",") && time.Now().Before(deadline); uiGet(t, e, "/ui/api/journal", &j) {
		time.Sleep(50 * time.Millisecond)
	}
	b, err := os.ReadFile(filepath.Join(dataDir, journal.WitnessCosignedFile))
	if err != nil {
		t.Fatalf("no cosigned checkpoint kept (journal view %+v): %v", j, err)
	}
	logKey, err := admin.CheckpointKey(admin.DataDir(dataDir), "")
	if err != nil {
		t.Fatal(err)
	}
	c, err := journal.OpenCosigned(b, logKey, w.VerifierKey())
	if err != nil {
		t.Fatal(err)
	}
	want := "; cosigned by the witness at size " + strconv.FormatUint(c.Size, 10) + ", " + c.At.UTC().Format(time.RFC3339)
	if c.Size != j.Checkpoint.Size || !strings.HasPrefix(j.Witness.State, "exported") || !strings.HasSuffix(j.Witness.State, want) {
		t.Errorf("witness state %q (checkpoint at size %d), want \"exported ...%s\"", j.Witness.State, j.Checkpoint.Size, want)
	}

	// Verify holds the journal to the cosigned checkpoint once its
	// cosignature verifies; an altered cosignature is a finding.
	if v := uiVerify(t, e); !v.OK || v.Checked != j.Size {
		t.Errorf("verify with the cosigned checkpoint: %+v, want OK over %d entries", v, j.Size)
	}
	altered := []byte(strings.Replace(string(b), "— "+c.Witness+" ", "— "+c.Witness+" A", 1))
	if err := os.WriteFile(filepath.Join(dataDir, journal.WitnessCosignedFile), altered, 0o600); err != nil {
		t.Fatal(err)
	}
	e.clock.Step(ui.DefaultVerifyInterval) // one verification per interval
	if v := uiVerify(t, e); v.OK || len(v.Findings) != 1 || !strings.HasPrefix(v.Findings[0].Detail, "witness-cosignature: ") {
		t.Errorf("verify with an altered cosignature: %+v, want one witness-cosignature finding", v)
	}
}

// uiVerify runs the journal view's Verify now.
func uiVerify(t *testing.T, e *env) ui.VerifyResult {
	t.Helper()
	base := "http://" + e.cp.Addrs().UI.String()
	var sess ui.Session
	uiGet(t, e, "/ui/api/session", &sess)
	req, _ := http.NewRequest(http.MethodPost, base+"/ui/api/journal/verify", nil)
	req.Header.Set("Origin", base)
	req.Header.Set(ui.CSRFHeader, sess.CSRFToken)
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	var v ui.VerifyResult
	if err := json.NewDecoder(r.Body).Decode(&v); err != nil || r.StatusCode != http.StatusOK {
		t.Fatalf("verify: %d %v", r.StatusCode, err)
	}
	return v
}

// newWitnessKey returns a tlog-witness's cosignature/v1 verifier key, as
// serve's --witness-key takes it.
func newWitnessKey(t *testing.T) string {
	t.Helper()
	w, err := witness.Open(t.TempDir(), "witness.example/test", time.Now)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { w.Close() })
	return w.VerifierKey()
}
