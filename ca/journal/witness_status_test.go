package journal_test

import (
	"context"
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
