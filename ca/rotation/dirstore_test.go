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

// TestDirStoreConcurrentWrites runs two writers against one CA directory at
// once, as `trustmesh ca rotate` and a running serve do. Each Write either
// succeeds or reports a conflict, and what is left on disk is one writer's
// files whole: never a mix, never an error from the other's temporary file.
func TestDirStoreConcurrentWrites(t *testing.T) {
	ctx := context.Background()
	for round := 0; round < 30; round++ {
		dir := t.TempDir()
		s := rotation.DirStore{Dir: dir}
		want := map[string][2][]byte{}
		var wg sync.WaitGroup
		errs := make([]error, 2)
		for w := 0; w < 2; w++ {
			state := []byte(fmt.Sprintf(`{"active": 1, "last_generation": 1, "writer": %d, "pad": %q}`, w, bytes.Repeat([]byte{'a' + byte(w)}, 256<<10)))
			cert := bytes.Repeat([]byte{'A' + byte(w)}, 512<<10)
			for name, data := range map[string][]byte{"rotation.json": state, "gen-1/ca-cert.pem": cert} {
				v := want[name]
				v[w] = data
				want[name] = v
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				errs[w] = s.Write(ctx, rotation.Snapshot{Files: map[string][]byte{"rotation.json": state, "gen-1/ca-cert.pem": cert}})
			}()
		}
		wg.Wait()
		for w, err := range errs {
			if err != nil && !errors.Is(err, rotation.ErrConflict) {
				t.Fatalf("round %d: writer %d: %v", round, w, err)
			}
		}
		for name, v := range want {
			got, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(name)))
			if err != nil {
				t.Fatalf("round %d: %v", round, err)
			}
			if !bytes.Equal(got, v[0]) && !bytes.Equal(got, v[1]) {
				t.Fatalf("round %d: %s holds neither writer's content whole (%d bytes)", round, name, len(got))
			}
		}
	}
}
