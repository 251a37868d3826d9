package mesh

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func clientDoc(i int) string {
	return fmt.Sprintf("apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Workload\nmetadata: {name: client-%d, namespace: shop}\n"+
		"spec: {spiffeID: spiffe://cluster.local/ns/shop/sa/client}\n", i)
}

func writeClients(t *testing.T, path string, from, to int) {
	t.Helper()
	var docs []string
	for i := from; i < to; i++ {
		docs = append(docs, clientDoc(i))
	}
	if err := os.WriteFile(path, []byte(strings.Join(docs, "---\n")), 0o600); err != nil {
		t.Fatal(err)
	}
}

func workloadsByName(t *testing.T, d *Dir) map[string]*Workload {
	t.Helper()
	m, err := d.Mesh()
	if err != nil {
		t.Fatal(err)
	}
	byName := map[string]*Workload{}
	for _, w := range m.Workloads {
		byName[w.Name] = w
	}
	return byName
}

// TestDirParsesOnlyWhatChanged: after a touch every document comes from the
// cache, and after one document of a file changes only that one is parsed
// again (a parse makes a new Workload; a cached one is shared).
func TestDirParsesOnlyWhatChanged(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "clients.yaml")
	writeClients(t, path, 0, 3)
	d := &Dir{Path: dir}
	first := workloadsByName(t, d)
	later := time.Now().Add(time.Hour)
	if err := os.Chtimes(path, later, later); err != nil {
		t.Fatal(err)
	}
	touched := workloadsByName(t, d)
	for n, w := range first {
		if touched[n] != w {
			t.Errorf("after a touch, %s was parsed again", n)
		}
	}
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	edited := strings.Replace(string(data), "name: client-1,", "name: client-9,", 1)
	if err := os.WriteFile(path, []byte(edited), 0o600); err != nil {
		t.Fatal(err)
	}
	after := workloadsByName(t, d)
	if after["client-0"] != first["client-0"] || after["client-2"] != first["client-2"] {
		t.Error("the documents that did not change were parsed again")
	}
	if after["client-1"] != nil || after["client-9"] == nil {
		t.Errorf("after renaming client-1 to client-9: %v", after)
	}
}

// TestDirCacheHoldsOnlyTheDirectory: as files and documents come and go,
// the cache holds the files and documents of the last read, no more.
func TestDirCacheHoldsOnlyTheDirectory(t *testing.T) {
	dir := t.TempDir()
	d := &Dir{Path: dir}
	for round := range 50 {
		// Ten documents in a file of a new name, five of them new, and one
		// file that keeps its name but changes each round.
		writeClients(t, filepath.Join(dir, fmt.Sprintf("round-%d.yaml", round)), round*5, round*5+10)
		writeClients(t, filepath.Join(dir, "same-name.yaml"), 1000+round, 1000+round+1)
		if round > 0 {
			if err := os.Remove(filepath.Join(dir, fmt.Sprintf("round-%d.yaml", round-1))); err != nil {
				t.Fatal(err)
			}
		}
		m, err := d.Mesh()
		if err != nil {
			t.Fatal(err)
		}
		if len(m.Workloads) != 11 {
			t.Fatalf("round %d: %d workloads, want 11", round, len(m.Workloads))
		}
		d.mu.Lock()
		files, docs := len(d.cache.files), len(d.cache.docs)
		d.mu.Unlock()
		if files != 2 || docs != 11 {
			t.Fatalf("round %d: the cache holds %d files and %d documents, want 2 and 11", round, files, docs)
		}
	}
}
