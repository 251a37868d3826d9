package controlplane_test

import (
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/xds"
)

// TestOneMeshFeed runs serve on a mesh directory with ext_authz (whose
// gateway identities come from the mesh) and xDS both on, edits the mesh
// twice, and checks that the two consumers follow one feed: the mesh is
// parsed and published once per change, not once per consumer.
func TestOneMeshFeed(t *testing.T) {
	demo, err := os.ReadFile("../examples/mesh/demo.yaml")
	if err != nil {
		t.Fatal(err)
	}
	meshDir := t.TempDir()
	file := filepath.Join(meshDir, "demo.yaml")
	write := func(extra int) {
		t.Helper()
		data := string(demo)
		for i := range extra {
			data += fmt.Sprintf(`---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: extra-%[1]d, namespace: demo}
spec: {spiffeID: spiffe://cluster.local/ns/demo/sa/extra-%[1]d}
`, i)
		}
		if err := os.WriteFile(file+".tmp", []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			t.Fatal(err)
		}
	}
	write(0)
	authzAddr := freeport.Addr(t)
	var logs lockedBuffer
	e := start(t, func(c *controlplane.Config) {
		c.XDS.MeshDir = meshDir
		c.Authz.PolicyDir = "../examples/mesh/policies"
		c.Listen.Authz = authzAddr
		c.Log = slog.New(slog.NewJSONHandler(&logs, nil))
	})
	count := func() (published, pushed int) {
		for _, l := range logs.lines(t) {
			switch l["msg"] {
			case "mesh snapshot published":
				published++
			case "xds configuration pushed":
				pushed++
			}
		}
		return published, pushed
	}
	// waitPushes waits until xDS has pushed n times, stepping its debounce,
	// which runs on the control plane's fake clock.
	waitPushes := func(n int) {
		t.Helper()
		deadline := time.Now().Add(30 * time.Second)
		for {
			if _, pushed := count(); pushed >= n {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("xDS did not push %d times", n)
			}
			if e.clock.HasWaiters() {
				e.clock.Step(xds.DefaultDebounce)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	waitPushes(1)
	const changes = 2
	for i := 1; i <= changes; i++ {
		write(i)
		waitPushes(1 + i)
	}
	// Anything a second feed would publish has settled by now.
	time.Sleep(time.Second)

	if published, pushed := count(); published != 1+changes || pushed != 1+changes {
		t.Fatalf("%d mesh snapshots published and %d xDS pushes for the first load and %d edits, want %d of each (one feed)",
			published, pushed, changes, 1+changes)
	}
	m := e.metrics()
	for _, want := range []string{
		fmt.Sprintf("trustmesh_mesh_snapshots_total %d", 1+changes),
		fmt.Sprintf("trustmesh_mesh_version %d", 1+changes),
		"trustmesh_mesh_refusals_total 0",
	} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
}
