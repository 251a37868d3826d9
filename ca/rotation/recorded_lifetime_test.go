package rotation_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	clocktesting "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/ca/rotation"
)

// rotation.json's recorded lifetimes are checked before ca rotate mints
// with them: a 1s intermediate lifetime (an edited or damaged state) is
// refused as corrupt, never minted into an intermediate that is dead a
// second later.
func TestRecordedLifetimesAreChecked(t *testing.T) {
	ctx := context.Background()
	clk := clocktesting.NewFakeClock(t0)
	dir := t.TempDir()
	store := rotation.DirStore{Dir: dir}
	serving, err := rotation.New(rotation.Config{Store: store, TrustDomain: td, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := serving.Initial(ctx); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, "rotation.json")
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatal(err)
	}
	m["intermediate_lifetime"] = int64(time.Second)
	b, _ = json.Marshal(m)
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
	op, err := rotation.Open(rotation.Config{Store: store, TrustDomain: td, Clock: clk})
	if err != nil {
		t.Fatal(err)
	}
	_, err = op.Taint(ctx, false)
	if !errors.Is(err, rotation.ErrCorruptState) || !strings.Contains(err.Error(), "intermediate lifetime of 1s") {
		t.Errorf("ca rotate --taint with a recorded 1s intermediate lifetime: %v, want it refused as a corrupt state naming the lifetime", err)
	}
}
