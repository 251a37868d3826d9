package rotation_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/trustmesh/trustmesh/ca/rotation"
)

// TestDirStoreConcurrentWrites runs writers against one CA directory at
// once, as `trustmesh ca rotate` and a running serve do, each replacing the
// state at the same version it read (compare-and-swap). Exactly one wins and
// every other gets ErrConflict, and what is left on disk is the winner's
// files whole: the state file and every generation file from one writer,
// never a mix, never an error from another's temporary file.
func TestDirStoreConcurrentWrites(t *testing.T) {
	ctx := context.Background()
	const writers = 3
	names := []string{"rotation.json", "gen-1/ca-cert.pem", "gen-2/ca-cert.pem", "gen-2/ca-key.pem"}
	for round := 0; round < 60; round++ {
		dir := t.TempDir()
		s := rotation.DirStore{Dir: dir}
		if err := s.Write(ctx, rotation.Snapshot{Files: map[string][]byte{
			"rotation.json": []byte(`{"active": 1, "last_generation": 1}`), "gen-1/ca-cert.pem": []byte("initial"),
		}}); err != nil {
			t.Fatal(err)
		}
		base, err := s.Read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		files := make([]map[string][]byte, writers)
		for w := range files {
			files[w] = map[string][]byte{}
			for i, name := range names {
				fill := bytes.Repeat([]byte{'a' + byte(w)}, (256+64*i)<<10)
				if name == "rotation.json" {
					fill = []byte(fmt.Sprintf(`{"active": 2, "last_generation": 2, "writer": %d, "pad": %q}`, w, fill))
				}
				files[w][name] = fill
			}
		}
		var wg sync.WaitGroup
		start := make(chan struct{})
		errs := make([]error, writers)
		for w := range writers {
			wg.Add(1)
			go func() {
				defer wg.Done()
				<-start
				errs[w] = s.Write(ctx, rotation.Snapshot{Files: files[w], Version: base.Version})
			}()
		}
		close(start)
		wg.Wait()
		winner := -1
		for w, err := range errs {
			switch {
			case err == nil && winner >= 0:
				t.Fatalf("round %d: writers %d and %d both replaced version %.8s", round, winner, w, base.Version)
			case err == nil:
				winner = w
			case !errors.Is(err, rotation.ErrConflict):
				t.Fatalf("round %d: writer %d: %v", round, w, err)
			}
		}
		if winner < 0 {
			t.Fatalf("round %d: no writer won: %v", round, errs)
		}
		for _, name := range names {
			got, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(name)))
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			if !bytes.Equal(got, files[winner][name]) {
				from := "no writer whole"
				for w := range files {
					if bytes.Equal(got, files[w][name]) {
						from = fmt.Sprintf("writer %d", w)
					}
				}
				t.Fatalf("round %d: writer %d won, but %s is from %s (%d bytes)", round, winner, name, from, len(got))
			}
		}
	}
}
