package mesh_test

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/mesh"
)

// writeBenchMesh writes the mesh bench/xds.sh serves: services.yaml with
// services HTTP services of two endpoints each (svc-0 with extra more) and,
// unless skipClients, clients.yaml with one Workload per client pod. The
// layout follows xds-load -gen, so that the figures are those of the 20,000
// client push.
func writeBenchMesh(tb testing.TB, dir string, services, clients, extra int, skipClients bool) {
	tb.Helper()
	var b strings.Builder
	for i := range services {
		fmt.Fprintf(&b, "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Service\nmetadata: {name: svc-%d, namespace: bench}\nspec:\n"+
			"  ports: [{name: http, port: 8080, protocol: HTTP}]\n  endpoints:\n", i)
		n := 2
		if i == 0 {
			n += extra
		}
		for j := range n {
			fmt.Fprintf(&b, "  - {address: 10.%d.%d.%d, pod: svc-%d-%d, spiffeID: spiffe://cluster.local/ns/bench/sa/svc-%d, labels: {app: svc-%d}}\n",
				i/250, i%250, j+1, i, j, i, i)
		}
		b.WriteString("---\n")
	}
	replaceFile(tb, filepath.Join(dir, "services.yaml"), b.String())
	if skipClients {
		return
	}
	b.Reset()
	for i := range clients {
		fmt.Fprintf(&b, "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Workload\nmetadata: {name: client-%d, namespace: bench}\n"+
			"spec: {spiffeID: spiffe://cluster.local/ns/bench/sa/client}\n---\n", i)
	}
	replaceFile(tb, filepath.Join(dir, "clients.yaml"), b.String())
}

// cpuTimer adds up the process's CPU time (user and system, every thread,
// so the collector's too) over the timed parts of a benchmark: on a shared
// machine wall time says little, CPU per operation more.
type cpuTimer struct {
	start, total time.Duration
}

func processCPU(tb testing.TB) time.Duration {
	var ru syscall.Rusage
	if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
		tb.Fatal(err)
	}
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

func (c *cpuTimer) begin(tb testing.TB) { c.start = processCPU(tb) }
func (c *cpuTimer) end(tb testing.TB)   { c.total += processCPU(tb) - c.start }

// report adds cpu-ns/op to b's results.
func (c *cpuTimer) report(b *testing.B) {
	b.ReportMetric(float64(c.total.Nanoseconds())/float64(b.N), "cpu-ns/op")
}

func replaceFile(tb testing.TB, path, content string) {
	tb.Helper()
	tmp := filepath.Join(filepath.Dir(path), "."+filepath.Base(path)+".tmp")
	if err := os.WriteFile(tmp, []byte(content), 0o644); err != nil {
		tb.Fatal(err)
	}
	if err := os.Rename(tmp, path); err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkDirMesh times Dir.Mesh on bench/xds.sh's mesh (1,000 services)
// at 2,000 and 20,000 clients:
//   - first: a new Dir's first read;
//   - change: a read after bench/xds.sh's change step (services.yaml
//     rewritten with one more endpoint on svc-0; clients.yaml untouched);
//   - same: a read of an unchanged directory;
//   - feed-change: what the change costs a Feed (the read, and the
//     comparison with the mesh in force that decides whether to publish);
//   - feed-same: the same for a directory that did not change (a touch, a
//     rewrite with the same bytes): the comparison goes through the whole
//     mesh and publishes nothing;
//   - validate: Mesh.Validate, which every consumer of the mesh runs.
//
// Besides wall time it reports cpu-ns/op, the process's CPU time over the
// timed reads only: on a shared machine wall time says little.
func BenchmarkDirMesh(b *testing.B) {
	td := spiffeid.RequireTrustDomainFromString("cluster.local")
	for _, clients := range []int{2000, 20000} {
		dir := b.TempDir()
		writeBenchMesh(b, dir, 1000, clients, 0, false)
		// change rewrites services.yaml as bench/xds.sh's change step does
		// and returns how many endpoints svc-0 has now.
		extra := 0
		change := func(b *testing.B) int {
			extra++
			writeBenchMesh(b, dir, 1000, clients, extra, true)
			return 2 + extra
		}
		svc0 := func(b *testing.B, m *mesh.Mesh, want int) {
			if got := len(m.Services[0].Endpoints); got != want {
				b.Fatalf("svc-0 has %d endpoints, want %d", got, want)
			}
		}
		cases := []struct {
			name string
			// setup returns one operation, given the endpoints svc-0 has
			// (0 where the directory did not change).
			setup   func(b *testing.B) func(want int)
			changes bool
		}{
			{name: "first", setup: func(b *testing.B) func(int) {
				return func(int) {
					if _, err := (&mesh.Dir{Path: dir}).Mesh(); err != nil {
						b.Fatal(err)
					}
				}
			}},
			{name: "change", changes: true, setup: func(b *testing.B) func(int) {
				d := &mesh.Dir{Path: dir}
				if _, err := d.Mesh(); err != nil {
					b.Fatal(err)
				}
				return func(want int) {
					m, err := d.Mesh()
					if err != nil {
						b.Fatal(err)
					}
					svc0(b, m, want)
				}
			}},
			{name: "same", setup: func(b *testing.B) func(int) {
				d := &mesh.Dir{Path: dir}
				if _, err := d.Mesh(); err != nil {
					b.Fatal(err)
				}
				return func(int) {
					if _, err := d.Mesh(); err != nil {
						b.Fatal(err)
					}
				}
			}},
			{name: "feed-change", changes: true, setup: func(b *testing.B) func(int) {
				f, err := mesh.NewFeed(mesh.FeedConfig{Source: &mesh.Dir{Path: dir}})
				if err != nil {
					b.Fatal(err)
				}
				if _, err := f.Load(); err != nil {
					b.Fatal(err)
				}
				return func(want int) {
					s, err := f.Load()
					if err != nil {
						b.Fatal(err)
					}
					svc0(b, s.Mesh, want)
				}
			}},
			{name: "feed-same", setup: func(b *testing.B) func(int) {
				f, err := mesh.NewFeed(mesh.FeedConfig{Source: &mesh.Dir{Path: dir}})
				if err != nil {
					b.Fatal(err)
				}
				first, err := f.Load()
				if err != nil {
					b.Fatal(err)
				}
				return func(int) {
					s, err := f.Load()
					if err != nil {
						b.Fatal(err)
					}
					if s != first {
						b.Fatal("an unchanged directory published a new snapshot")
					}
				}
			}},
			{name: "validate", setup: func(b *testing.B) func(int) {
				m, err := (&mesh.Dir{Path: dir}).Mesh()
				if err != nil {
					b.Fatal(err)
				}
				return func(int) {
					if err := m.Validate(td); err != nil {
						b.Fatal(err)
					}
				}
			}},
		}
		for _, c := range cases {
			b.Run(fmt.Sprintf("clients=%d/%s", clients, c.name), func(b *testing.B) {
				op := c.setup(b)
				var cpu cpuTimer
				for b.Loop() {
					want := 0
					if c.changes {
						b.StopTimer()
						want = change(b)
						b.StartTimer()
					}
					cpu.begin(b)
					op(want)
					cpu.end(b)
				}
				cpu.report(b)
			})
		}
	}
}
