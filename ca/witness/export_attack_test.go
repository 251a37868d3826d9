package witness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// A forged 409 (from a MITM on http, a misbehaving proxy, or a witness
// hiccup) is unauthenticated: it is used for that export only, so it cannot
// make every later export "inconsistent" without the witness being asked.
func TestForged409DoesNotPoisonLaterExports(t *testing.T) {
	ctx := context.Background()
	k := newLogKey(t)
	w := openWitness(t, t.TempDir(), k)
	honest := Handler(w)
	var forge atomic.Bool
	var reached atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if forge.Load() {
			rw.WriteHeader(http.StatusConflict)
			fmt.Fprintf(rw, "%d\n", uint64(1)<<62)
			return
		}
		reached.Add(1)
		honest.ServeHTTP(rw, r)
	}))
	defer srv.Close()
	tr := newTree(40, nil)
	e, err := journal.NewExport(journal.ExportConfig{Target: srv.URL, Key: w.VerifierKey(), Cosigned: filepath.Join(t.TempDir(), "c")})
	if err != nil {
		t.Fatal(err)
	}
	e.SetProver(treeProver{tr})
	push := func(size uint64) error { e.Offer(tr.checkpoint(t, k, size)); return e.Flush(ctx) }
	if err := push(3); err != nil {
		t.Fatal(err)
	}
	forge.Store(true)
	_ = push(4) // one forged answer
	forge.Store(false)
	before := reached.Load()
	for _, size := range []uint64{10, 20, 30} {
		err := push(size)
		var we *journal.WitnessError
		if errors.As(err, &we) && we.Reason == journal.ReasonInconsistent && reached.Load() == before {
			t.Errorf("size %d: honest journal, honest witness back, yet: %v (witness not even contacted)", size, err)
		}
	}
}

// The export follows no redirect: otherwise a witness (or anything on its
// path over http) could 307 serve's POST to an internal URL and have the
// first line of that URL's answer logged and shown in the UI.
func TestExportFollowsNoRedirect(t *testing.T) {
	ctx := context.Background()
	k := newLogKey(t)
	internal := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		rw.WriteHeader(http.StatusTeapot)
		io.WriteString(rw, "INTERNAL-SECRET-token=abc123\n")
	}))
	defer internal.Close()
	evil := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		http.Redirect(rw, r, internal.URL+"/admin/secret", http.StatusTemporaryRedirect)
	}))
	defer evil.Close()
	tr := newTree(10, nil)
	e, err := journal.NewExport(journal.ExportConfig{Target: evil.URL})
	if err != nil {
		t.Fatal(err)
	}
	e.SetProver(treeProver{tr})
	e.Offer(tr.checkpoint(t, k, 3))
	_ = e.Flush(ctx)
	if st := e.Status(); strings.Contains(st.LastError, "INTERNAL-SECRET") {
		t.Errorf("the export followed the witness's redirect and reflects the internal answer: %q", st.LastError)
	}
}

// Two replicas share one journal and push to one witness: a replica whose
// checkpoint reaches the witness after the other's larger one is stale, not
// a sign that the journal was cut or rolled back.
func TestReplicasRacingToOneWitnessAreNotAnIncident(t *testing.T) {
	ctx := context.Background()
	k := newLogKey(t)
	w := openWitness(t, t.TempDir(), k)
	srv := httptest.NewServer(Handler(w))
	defer srv.Close()
	tr := newTree(40, nil) // the one shared log
	replica := func() *journal.ExportWitness {
		e, err := journal.NewExport(journal.ExportConfig{Target: srv.URL, Key: w.VerifierKey(), Cosigned: filepath.Join(t.TempDir(), "c")})
		if err != nil {
			t.Fatal(err)
		}
		e.SetProver(treeProver{tr})
		return e
	}
	a, b := replica(), replica()
	b.Offer(tr.checkpoint(t, k, 20)) // b committed entries 15..19 after a's commit at 15
	if err := b.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	a.Offer(tr.checkpoint(t, k, 15)) // a's export of its own commit arrives second
	err := a.Flush(ctx)
	var we *journal.WitnessError
	if errors.As(err, &we) && we.Reason == journal.ReasonInconsistent {
		t.Errorf("an honest shared journal reported as an incident: %v", err)
	}
}
