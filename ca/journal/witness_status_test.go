package journal_test

import (
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"fmt"
	"path/filepath"
	"testing"

	"github.com/trustmesh/trustmesh/ca/journal"
)

// TestWitnessStatus: the witness reports the size of the last checkpoint it
// exported, and the error of an export that failed, for the web UI.
func TestWitnessStatus(t *testing.T) {
	dir := t.TempDir()
	w := journal.NewExportWitness(filepath.Join(dir, "witness"), nil)
	if st := w.Status(); !st.LastExport.IsZero() || st.LastError != "" || st.Target != filepath.Join(dir, "witness") {
		t.Fatalf("status before any export = %+v", st)
	}
	w.Offer([]byte("trustmesh.journal/td\n7\nroot\n\n— sig\n"))
	if err := w.Flush(context.Background()); err != nil {
		t.Fatal(err)
	}
	if st := w.Status(); st.LastExport.IsZero() || st.LastSize != 7 || st.LastError != "" {
		t.Fatalf("status after an export = %+v, want size 7 and no error", st)
	}
	bad := journal.NewExportWitness(filepath.Join(dir, "missing", "witness"), nil)
	bad.Offer([]byte("trustmesh.journal/td\n8\nroot\n"))
	if err := bad.Flush(context.Background()); err == nil {
		t.Fatal("an export into a missing directory succeeded")
	}
	if st := bad.Status(); st.LastError == "" || st.ErrorAt.IsZero() || !st.LastExport.IsZero() {
		t.Fatalf("status after a failed export = %+v", st)
	}
}

// TestLatestCheckpoint returns the checkpoint of the largest size, the
// last of Checkpoints.
func TestLatestCheckpoint(t *testing.T) {
	eachBackend(t, func(t *testing.T, b backend) {
		s := b.open(t)
		ctx := context.Background()
		if _, err := s.LatestCheckpoint(ctx); !errors.Is(err, journal.ErrNotFound) {
			t.Fatalf("an empty journal's latest checkpoint: %v, want ErrNotFound", err)
		}
		for i := range 3 {
			if err := s.RecordRotation(ctx, journal.Rotation{Step: "prepare", Role: "root", Serial: fmt.Sprint(i)}); err != nil {
				t.Fatal(err)
			}
		}
		all, err := s.Checkpoints(ctx)
		if err != nil {
			t.Fatal(err)
		}
		got, err := s.LatestCheckpoint(ctx)
		if err != nil || len(all) == 0 || got.Size != 3 || string(got.Note) != string(all[len(all)-1].Note) {
			t.Fatalf("LatestCheckpoint = %+v, %v; want size 3, the last of %d", got, err, len(all))
		}
	})
}

// TestNewExportRefusesABadWitnessKey: serve refuses to start with a
// --witness-key that is not a cosignature/v1 key (the journal's own
// Ed25519 note key, type 0x01), or whose key hash does not match its name
// and key, rather than failing every cosignature later.
func TestNewExportRefusesABadWitnessKey(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, logKey, err := journal.NewCheckpointSigner("trustmesh.journal/example.org", priv)
	if err != nil {
		t.Fatal(err)
	}
	keyData := append([]byte{journal.AlgCosignatureV1}, priv.Public().(ed25519.PublicKey)...)
	good := fmt.Sprintf("witness.example/w+%08x+%s", journal.NoteKeyHash("witness.example/w", keyData), base64.StdEncoding.EncodeToString(keyData))
	wrongHash := fmt.Sprintf("witness.example/w+%08x+%s", journal.NoteKeyHash("witness.example/x", keyData), base64.StdEncoding.EncodeToString(keyData))
	for name, c := range map[string]struct {
		key string
		ok  bool
	}{
		"a cosignature/v1 key":       {good, true},
		"the log's own note key":     {logKey, false},
		"a key hash of another name": {wrongHash, false},
		"not a key":                  {"witness.example/w", false},
	} {
		_, err := journal.NewExport(journal.ExportConfig{Target: "https://witness.example/", Key: c.key})
		if (err == nil) != c.ok {
			t.Errorf("%s: %v, want ok=%v", name, err, c.ok)
		}
	}
}
