package witness

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"fmt"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/mod/sumdb/note"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// treeProver proves consistency within one tree, as the journal's store
// does from its entries.
type treeProver struct{ tr *tree }

func (p treeProver) ConsistencyBetween(_ context.Context, size1, size2 uint64) ([][]byte, error) {
	if size1 > size2 || size2 > uint64(len(p.tr.leaves)) {
		return nil, fmt.Errorf("the log holds %d entries: no proof from %d to %d", len(p.tr.leaves), size1, size2)
	}
	return journal.ConsistencyProof(p.tr.leaves[:size2], size1)
}

// TestExportSpeaksTlogWitness drives serve's checkpoint export (the
// tlog-witness client) against this package's add-checkpoint handler:
// each checkpoint is cosigned after a proof from the witness's size, a
// restarted client learns that size from a 409, and a fork, a rollback, a
// cosignature by another key and an unknown log are refused with the
// reason an operator alerts on; nothing refused is kept as cosigned.
func TestExportSpeaksTlogWitness(t *testing.T) {
	ctx := context.Background()
	k := newLogKey(t)
	w := openWitness(t, t.TempDir(), k)
	srv := httptest.NewServer(Handler(w))
	defer srv.Close()
	honest := newTree(40, nil)
	cosignedFile := filepath.Join(t.TempDir(), journal.WitnessCosignedFile)

	newExport := func(key string, tr *tree) *journal.ExportWitness {
		t.Helper()
		e, err := journal.NewExport(journal.ExportConfig{Target: srv.URL + "/", Key: key, Cosigned: cosignedFile})
		if err != nil {
			t.Fatal(err)
		}
		e.SetProver(treeProver{tr})
		return e
	}
	push := func(e *journal.ExportWitness, tr *tree, size uint64) error {
		e.Offer(tr.checkpoint(t, k, size))
		return e.Flush(ctx)
	}
	cosignedSize := func() uint64 {
		t.Helper()
		b, err := os.ReadFile(cosignedFile)
		if err != nil {
			t.Fatal(err)
		}
		c, err := journal.OpenCosigned(b, k.vkey, w.VerifierKey())
		if err != nil {
			t.Fatalf("the kept cosigned checkpoint: %v\n%s", err, b)
		}
		if _, err := journal.OpenCosigned(b, k.vkey, newCosignerKey(t)); !errors.Is(err, journal.ErrCosignature) {
			t.Fatalf("the kept checkpoint opens with another witness's key: %v", err)
		}
		return c.Size
	}
	reason := func(err error) string {
		var we *journal.WitnessError
		if errors.As(err, &we) {
			return we.Reason
		}
		return "not a WitnessError: " + strings.TrimSpace(err.Error())
	}

	e := newExport(w.VerifierKey(), honest)
	for _, size := range []uint64{3, 7, 7, 20} {
		if err := push(e, honest, size); err != nil {
			t.Fatalf("size %d: %v", size, err)
		}
		if st := e.Status(); st.Cosigned != size || !st.CosignedAt.Equal(epoch) || st.LastError != "" {
			t.Fatalf("size %d: status %+v", size, st)
		}
		if got := cosignedSize(); got != size {
			t.Fatalf("kept cosigned size %d, want %d", got, size)
		}
	}
	if sizes, _ := w.History(origin); len(sizes) != 3 || sizes[2] != 20 {
		t.Fatalf("the witness's history %v, want [3 7 20]", sizes)
	}

	// A restarted CA does not know the witness's size: the 409 tells it.
	e = newExport(w.VerifierKey(), honest)
	if err := push(e, honest, 25); err != nil || e.Status().Cosigned != 25 {
		t.Fatalf("after a restart: %v, status %+v", err, e.Status())
	}

	forked := newTree(40, map[int]string{4: "rewritten"})
	rolledBack := &tree{leaves: honest.leaves[:10]} // the journal cut back to 10 entries
	for _, c := range []struct {
		name   string
		e      *journal.ExportWitness
		tr     *tree
		size   uint64
		reason string
	}{
		{"a fork, with a proof right for its own tree", newExport(w.VerifierKey(), forked), forked, 30, journal.ReasonInconsistent},
		{"the same fork from a client that knows the witness's size", e, forked, 30, journal.ReasonInconsistent},
		{"a rolled-back journal", newExport(w.VerifierKey(), rolledBack), rolledBack, 10, journal.ReasonInconsistent},
		{"a cosignature by another witness key", newExport(newCosignerKey(t), honest), honest, 30, journal.ReasonBadCosignature},
	} {
		if c.e == e {
			c.e.SetProver(treeProver{c.tr})
		}
		err := push(c.e, c.tr, c.size)
		if err == nil || reason(err) != c.reason {
			t.Errorf("%s: %v, want reason %s", c.name, err, c.reason)
		}
		if st := c.e.Status(); st.LastError == "" || st.Cosigned == c.size {
			t.Errorf("%s: status %+v", c.name, st)
		}
		if got := cosignedSize(); got != 25 {
			t.Errorf("%s: the kept cosigned size is %d, want 25", c.name, got)
		}
		if c.reason != journal.ReasonBadCosignature {
			if n := failures(t, c.e, c.reason); n != 1 {
				t.Errorf("%s: failures{reason=%s} = %v, want 1", c.name, c.reason, n)
			}
		}
	}

	// Another log's checkpoints: the witness does not know the origin.
	other := newExport(w.VerifierKey(), honest)
	otherKey := newLogKeyNamed(t, "trustmesh.journal/other.example")
	other.Offer(honest.checkpointAs(t, otherKey, "trustmesh.journal/other.example", 5))
	if err := other.Flush(ctx); err == nil || reason(err) != journal.ReasonRefused {
		t.Errorf("an unknown log: %v, want reason %s", err, journal.ReasonRefused)
	}

	// The witness down: an outage, not an inconsistency.
	srv.Close()
	if err := push(newExport(w.VerifierKey(), honest), honest, 30); err == nil || reason(err) != journal.ReasonUnreachable {
		t.Errorf("the witness down: %v, want reason %s", err, journal.ReasonUnreachable)
	}
}

// failures reads trustmesh_journal_witness_failures_total{reason} of e.
func failures(t *testing.T, e *journal.ExportWitness, reason string) float64 {
	t.Helper()
	reg := prometheus.NewPedanticRegistry()
	reg.MustRegister(e)
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "trustmesh_journal_witness_failures_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "reason" && l.GetValue() == reason {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	t.Fatalf("no failures_total{reason=%q}", reason)
	return 0
}

// newCosignerKey is the verifier key of a witness other than the one
// under test.
func newCosignerKey(t *testing.T) string {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c, err := newCosigner("witness.test/one", priv)
	if err != nil {
		t.Fatal(err)
	}
	return c.vkey
}

func newLogKeyNamed(t *testing.T, name string) logKey {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	s, vkey, err := journal.NewCheckpointSigner(name, priv)
	if err != nil {
		t.Fatal(err)
	}
	return logKey{s, vkey}
}

func (tr *tree) checkpointAs(t *testing.T, k logKey, name string, size uint64) []byte {
	t.Helper()
	signed, err := note.Sign(&note.Note{Text: journal.Checkpoint{Origin: name, Size: size, Root: tr.root(t, size)}.Text()}, k.signer)
	if err != nil {
		t.Fatal(err)
	}
	return signed
}
