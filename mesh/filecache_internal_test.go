package mesh

import (
	"fmt"
	"os"
	"path/filepath"
	"reflect"
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
	// A file that fails keeps the documents that parsed for the next
	// read, which finds it mended.
	broken := strings.Replace(edited, "kind: Workload\nmetadata: {name: client-0,", "kind: Workloda\nmetadata: {name: client-0,", 1)
	if err := os.WriteFile(path, []byte(broken), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, err := d.Mesh(); err == nil {
		t.Fatal("a file with an unknown kind was read")
	}
	if err := os.WriteFile(path, []byte(edited), 0o600); err != nil {
		t.Fatal(err)
	}
	mended := workloadsByName(t, d)
	if mended["client-2"] != first["client-2"] || mended["client-9"] != after["client-9"] {
		t.Error("after a failed read, the documents that had parsed were parsed again")
	}
}

// TestDocParseKeepsEveryKind: what a document parses to comes back whole
// from the cache, for every list a Mesh has; a list added to Mesh without
// a place in docParse fails here.
func TestDocParseKeepsEveryKind(t *testing.T) {
	var in Mesh
	v := reflect.ValueOf(&in).Elem()
	lists := 0
	for i := range v.NumField() {
		f := v.Field(i)
		if !v.Type().Field(i).IsExported() || f.Kind() != reflect.Slice {
			continue
		}
		e := reflect.New(f.Type().Elem()).Elem()
		if e.Kind() == reflect.Pointer {
			e.Set(reflect.New(e.Type().Elem()))
		}
		f.Set(reflect.Append(f, e))
		lists++
	}
	var out Mesh
	newDocParse(&in, false).addTo(&out)
	o := reflect.ValueOf(&out).Elem()
	for i := range o.NumField() {
		if name := o.Type().Field(i).Name; v.Field(i).Kind() == reflect.Slice && v.Type().Field(i).IsExported() && o.Field(i).Len() != 1 {
			t.Errorf("Mesh.%s: %d objects came back from the cache, want 1", name, o.Field(i).Len())
		}
	}
	if lists < 7 {
		t.Fatalf("only %d lists in Mesh", lists)
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
		checkCacheHolds(t, d, 2, 11)
	}
	// A broken file whose good documents change each round.
	for round := range 20 {
		data := clientDoc(2000+round) + "---\n" + clientDoc(3000+round) + "---\nkind: Workloda\n"
		if err := os.WriteFile(filepath.Join(dir, "broken.yaml"), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
		if _, err := d.Mesh(); err == nil {
			t.Fatal("a file with an unknown kind was read")
		}
		checkCacheHolds(t, d, 2, 13)
	}
}

// checkCacheHolds checks the number of whole files and of documents d's
// cache holds.
func checkCacheHolds(t *testing.T, d *Dir, wantFiles, wantDocs int) {
	t.Helper()
	d.mu.Lock()
	defer d.mu.Unlock()
	files, docs := len(d.cache.files), len(d.cache.loose)
	for _, f := range d.cache.files {
		docs += len(f.docs)
	}
	if files != wantFiles || docs != wantDocs {
		t.Fatalf("the cache holds %d files and %d documents, want %d and %d", files, docs, wantFiles, wantDocs)
	}
}
