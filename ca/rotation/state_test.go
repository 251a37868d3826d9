package rotation_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/ca/rotation"
)

// TestDirStoreRefusesACorruptState: a state file that is empty, truncated,
// garbage or names no generation, or that is missing beside generations of
// CA material, is refused with ErrCorruptState naming the file, never read
// as "no CA yet" (which would make a serving manager create a new CA over
// the old one's directory).
func TestDirStoreRefusesACorruptState(t *testing.T) {
	good := `{"active": 1, "last_generation": 1}`
	cases := []struct {
		name  string
		state *string // nil: no state file
		want  string
	}{
		{"empty", ptr(""), "is empty"},
		{"truncated", ptr(good[:len(good)/2]), "truncated or overwritten"},
		{"garbage", ptr("\x00\xffPK\x03\x04"), "truncated or overwritten"},
		{"no active generation", ptr(`{"last_generation": 1}`), "no valid active generation"},
		{"missing", nil, "is missing beside 1 generation"},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.MkdirAll(filepath.Join(dir, "gen-1"), 0o700); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, "gen-1", "ca-cert.pem"), []byte("material"), 0o600); err != nil {
				t.Fatal(err)
			}
			if tc.state != nil {
				if err := os.WriteFile(filepath.Join(dir, "rotation.json"), []byte(*tc.state), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			_, err := rotation.DirStore{Dir: dir}.Read(context.Background())
			if !errors.Is(err, rotation.ErrCorruptState) {
				t.Fatalf("Read = %v, want ErrCorruptState", err)
			}
			for _, w := range []string{tc.want, filepath.Join(dir, "rotation.json"), "restore"} {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
		})
	}
}

// TestDirStoreFirstWriteInterrupted: a first start that stopped after
// writing generation 1 but before the state that names it left material
// that nothing was ever served from; the next start may replace it. After
// a complete write, the same directory with its state removed is refused.
func TestDirStoreFirstWriteInterrupted(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	s := rotation.DirStore{Dir: dir}
	// What the first write leaves when it stops before the state.
	if err := os.WriteFile(filepath.Join(dir, ".creating"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(filepath.Join(dir, "gen-1"), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "gen-1", "ca-cert.pem"), []byte("half"), 0o600); err != nil {
		t.Fatal(err)
	}
	snap, err := s.Read(ctx)
	if err != nil || snap.Version != "" {
		t.Fatalf("Read after an interrupted first write = %+v, %v; want no state", snap, err)
	}
	if err := s.Write(ctx, rotation.Snapshot{Files: map[string][]byte{
		"rotation.json": []byte(`{"active": 1, "last_generation": 1}`), "gen-1/ca-cert.pem": []byte("whole"),
	}}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(dir, ".creating")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("the first-write marker is still there after the write: %v", err)
	}
	if err := os.Remove(filepath.Join(dir, "rotation.json")); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Read(ctx); !errors.Is(err, rotation.ErrCorruptState) {
		t.Fatalf("Read of a written CA whose state was removed = %v, want ErrCorruptState", err)
	}
}

func ptr(s string) *string { return &s }
