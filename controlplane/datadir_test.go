package controlplane_test

import (
	"context"
	"io"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/trustmesh/trustmesh/controlplane"
)

// TestConcurrentFirstStartsOnOneDataDir starts two control planes at once on
// one data directory that does not exist yet, many times: one starts, its
// directory and CA stay, and the other is refused because the directory is
// in use; it never removes the directory the first is creating its CA in.
func TestConcurrentFirstStartsOnOneDataDir(t *testing.T) {
	rounds := 20
	if testing.Short() {
		rounds = 5
	}
	for round := range rounds {
		dataDir := filepath.Join(t.TempDir(), "data")
		cfg := controlplane.Config{
			DataDir: dataDir,
			Listen: controlplane.ListenConfig{
				CA: "127.0.0.1:0", Monitoring: "127.0.0.1:0", Authz: "off", Injector: "off",
			},
			Kubernetes: controlplane.KubernetesConfig{Mode: controlplane.KubernetesOff},
			Log:        slog.New(slog.NewTextHandler(io.Discard, nil)),
		}
		var wg sync.WaitGroup
		cps := make([]*controlplane.ControlPlane, 2)
		errs := make([]error, 2)
		for i := range 2 {
			wg.Go(func() { cps[i], errs[i] = controlplane.New(context.Background(), cfg) })
		}
		wg.Wait()
		var started *controlplane.ControlPlane
		var refused error
		for i := range 2 {
			if errs[i] == nil {
				started = cps[i]
			} else {
				refused = errs[i]
			}
		}
		if started == nil || refused == nil {
			t.Fatalf("round %d: want one start and one refusal, got errors %v and %v", round, errs[0], errs[1])
		}
		if !strings.Contains(refused.Error(), "data dir "+dataDir+" is in use by trustmesh serve pid") {
			t.Errorf("round %d: the second start was refused with %q, want the data dir in use", round, refused)
		}
		for _, f := range []string{"journal.db", "checkpoint-key.pem", "serve.lock"} {
			if _, err := os.Stat(filepath.Join(dataDir, f)); err != nil {
				t.Errorf("round %d: the started control plane's %s: %v", round, f, err)
			}
		}
		ctx, cancel := context.WithCancel(context.Background())
		cancel()
		if err := started.Run(ctx); err != nil {
			t.Errorf("round %d: Run: %v", round, err)
		}
	}
}
