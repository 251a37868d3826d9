package mesh_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/mesh"
)

const (
	cacheServices = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{name: http, port: 80, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, pod: web-0, spiffeID: spiffe://cluster.local/ns/shop/sa/web, labels: {app: web}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: db, namespace: shop}
spec:
  ports: [{name: tcp, port: 5432, protocol: TCP}]
  endpoints:
  - {address: 10.0.0.9, pod: db-0, spiffeID: spiffe://cluster.local/ns/shop/sa/db}
`
	cacheSecret = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: TLSSecret
metadata: {name: shop-cert, namespace: istio-system}
spec: {certFile: tls/cert.pem, keyFile: tls/key.pem}
`
	cacheClients = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: client-0, namespace: shop}
spec: {spiffeID: spiffe://cluster.local/ns/shop/sa/client}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: client-1, namespace: shop}
spec: {spiffeID: spiffe://cluster.local/ns/shop/sa/client}
`
	// cacheWebWorkload is the Workload of the pod behind web's endpoint:
	// Dir.Mesh makes the two one workload, on node-a.
	cacheWebWorkload = `---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: shop}
spec: {spiffeID: spiffe://cluster.local/ns/shop/sa/web, labels: {app: web}, node: node-a}
`
)

// rewriteKeepingStat replaces path's content with data of the same length
// and puts back its modification time, so that only its bytes tell the
// change.
func rewriteKeepingStat(t *testing.T, path, data string) {
	t.Helper()
	before, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(data)) != before.Size() {
		t.Fatalf("%s: the rewrite is %d bytes, the file %d", path, len(data), before.Size())
	}
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, before.ModTime(), before.ModTime()); err != nil {
		t.Fatal(err)
	}
	after, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if after.Size() != before.Size() || !after.ModTime().Equal(before.ModTime()) {
		t.Fatalf("%s: size and time %d %v, want %d %v", path, after.Size(), after.ModTime(), before.Size(), before.ModTime())
	}
}

func writeFile(t *testing.T, path, data string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

// sameModel reports whether two meshes hold the same model.
func sameModel(a, b *mesh.Mesh) bool {
	return reflect.DeepEqual(a.Services, b.Services) && reflect.DeepEqual(a.Workloads, b.Workloads) &&
		reflect.DeepEqual(a.External, b.External) && reflect.DeepEqual(a.Gateways, b.Gateways) &&
		reflect.DeepEqual(a.Secrets, b.Secrets) && reflect.DeepEqual(a.Refusals, b.Refusals) &&
		reflect.DeepEqual(a.Nodes, b.Nodes)
}

func workloadNames(m *mesh.Mesh) string {
	var names []string
	for _, w := range m.Workloads {
		names = append(names, w.Name)
	}
	return strings.Join(names, ",")
}

// TestDirSeesEveryChange: a Dir that has read its directory before (and
// so parses only what changed) returns, after each change, what a new Dir
// returns, and each change shows. The changes are those that a cache keyed
// on anything but the bytes read would miss: a file, or a certificate file
// a TLSSecret names, rewritten with the same size and modification time; a
// deleted file; a moved document; a new Domain.
func TestDirSeesEveryChange(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "services.yaml"), cacheServices)
	writeFile(t, filepath.Join(dir, "clients.yaml"), cacheClients)
	writeFile(t, filepath.Join(dir, "secret.yaml"), cacheSecret)
	writeFile(t, filepath.Join(dir, "tls", "cert.pem"), "CERT-1")
	writeFile(t, filepath.Join(dir, "tls", "key.pem"), "KEY-1")
	warm := &mesh.Dir{Path: dir}
	if _, err := warm.Mesh(); err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct {
		name   string
		change func(t *testing.T)
		check  func(t *testing.T, m *mesh.Mesh)
	}{{
		name: "file rewritten with the same size and time",
		change: func(t *testing.T) {
			rewriteKeepingStat(t, filepath.Join(dir, "services.yaml"), strings.Replace(cacheServices, "10.0.0.1", "10.0.0.2", 1))
		},
		check: func(t *testing.T, m *mesh.Mesh) {
			if got := m.Services[1].Endpoints[0].Address; m.Services[1].Name != "web" || got != "10.0.0.2" {
				t.Errorf("web's endpoint is %s, want 10.0.0.2", got)
			}
		},
	}, {
		name: "certificate rewritten with the same size and time",
		change: func(t *testing.T) {
			rewriteKeepingStat(t, filepath.Join(dir, "tls", "cert.pem"), "CERT-2")
		},
		check: func(t *testing.T, m *mesh.Mesh) {
			if got := string(m.Secrets[0].CertPEM); got != "CERT-2" {
				t.Errorf("the secret's certificate is %q, want CERT-2", got)
			}
		},
	}, {
		name: "document moved to another file",
		change: func(t *testing.T) {
			writeFile(t, filepath.Join(dir, "web-0.yaml"), cacheWebWorkload)
		},
		check: func(t *testing.T, m *mesh.Mesh) {
			if got := m.Services[1].Endpoints[0].Workload.Node; got != "node-a" {
				t.Errorf("web's endpoint is on node %q, want node-a", got)
			}
		},
	}, {
		name: "file deleted",
		change: func(t *testing.T) {
			if err := os.Remove(filepath.Join(dir, "clients.yaml")); err != nil {
				t.Fatal(err)
			}
		},
		check: func(t *testing.T, m *mesh.Mesh) {
			if got := workloadNames(m); got != "web-0" {
				t.Errorf("workloads %s, want web-0 alone", got)
			}
		},
	}, {
		name: "file back under another name",
		change: func(t *testing.T) {
			writeFile(t, filepath.Join(dir, "more-clients.yml"), cacheClients)
		},
		check: func(t *testing.T, m *mesh.Mesh) {
			if got := workloadNames(m); got != "client-0,client-1,web-0" {
				t.Errorf("workloads %s, want client-0,client-1,web-0", got)
			}
		},
	}, {
		name: "domain changed",
		change: func(t *testing.T) {
			warm.Domain = "example.org"
		},
		check: func(t *testing.T, m *mesh.Mesh) {
			if got := m.Services[1].Hostname; got != "web.shop.svc.example.org" {
				t.Errorf("web's hostname is %s, want web.shop.svc.example.org", got)
			}
		},
	}} {
		t.Run(step.name, func(t *testing.T) {
			step.change(t)
			got, err := warm.Mesh()
			if err != nil {
				t.Fatal(err)
			}
			step.check(t, got)
			want, err := (&mesh.Dir{Path: dir, Domain: warm.Domain}).Mesh()
			if err != nil {
				t.Fatal(err)
			}
			if !sameModel(got, want) {
				t.Errorf("the warm Dir's mesh differs from a new Dir's")
			}
		})
	}
}

// TestDirRefusesABrokenFileWhenTheRestIsCached: a document that no longer
// parses, or a certificate file that is gone, fails the whole read as on a
// first read, even though every other document was parsed before, and
// fails every read until it is mended; a Feed keeps the last good mesh.
func TestDirRefusesABrokenFileWhenTheRestIsCached(t *testing.T) {
	dir := t.TempDir()
	services := filepath.Join(dir, "services.yaml")
	writeFile(t, services, cacheServices)
	writeFile(t, filepath.Join(dir, "clients.yaml"), cacheClients)
	writeFile(t, filepath.Join(dir, "secret.yaml"), cacheSecret)
	writeFile(t, filepath.Join(dir, "tls", "cert.pem"), "CERT")
	writeFile(t, filepath.Join(dir, "tls", "key.pem"), "KEY")
	feed, err := mesh.NewFeed(mesh.FeedConfig{Source: &mesh.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	good, err := feed.Load()
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name         string
		break_, mend func(t *testing.T)
		// want is in the error, besides ErrFile
		want string
	}{{
		name: "a document that does not parse",
		break_: func(t *testing.T) {
			writeFile(t, services, strings.Replace(cacheServices, "port: 5432", "port: -1", 1))
		},
		mend: func(t *testing.T) { writeFile(t, services, cacheServices) },
		want: "services.yaml (document 2)",
	}, {
		name: "an unknown field",
		break_: func(t *testing.T) {
			writeFile(t, services, strings.Replace(cacheServices, "address: 10.0.0.9,", "adress: 10.0.0.9,", 1))
		},
		mend: func(t *testing.T) { writeFile(t, services, cacheServices) },
		want: "services.yaml (document 2)",
	}, {
		name: "a certificate file that is gone",
		break_: func(t *testing.T) {
			if err := os.Remove(filepath.Join(dir, "tls", "cert.pem")); err != nil {
				t.Fatal(err)
			}
		},
		mend: func(t *testing.T) { writeFile(t, filepath.Join(dir, "tls", "cert.pem"), "CERT") },
		want: "secret.yaml (document 1): certFile",
	}} {
		t.Run(c.name, func(t *testing.T) {
			c.break_(t)
			// The second read finds the broken file as the first left it.
			for range 2 {
				_, err := feed.Load()
				if !errors.Is(err, mesh.ErrFile) || !strings.Contains(err.Error(), c.want) {
					t.Fatalf("Load: %v, want %v naming %s", err, mesh.ErrFile, c.want)
				}
				if cur := feed.Current(); cur != good {
					t.Fatalf("the feed moved to version %d on a broken file", cur.Version)
				}
			}
			c.mend(t)
			if _, err := feed.Load(); err != nil {
				t.Fatalf("Load after mending: %v", err)
			}
		})
	}
}

// TestDirMeshesStayImmutable: a read does not change a mesh an earlier
// read returned, though both are built from the same cached documents:
// here the later read joins web's endpoint to a Workload document the
// earlier one did not have.
func TestDirMeshesStayImmutable(t *testing.T) {
	dir := t.TempDir()
	writeFile(t, filepath.Join(dir, "services.yaml"), cacheServices)
	d := &mesh.Dir{Path: dir}
	before, err := d.Mesh()
	if err != nil {
		t.Fatal(err)
	}
	web := before.Services[1]
	if web.Name != "web" || web.Endpoints[0].Workload.Node != "" {
		t.Fatalf("web's endpoint: %+v", web.Endpoints[0].Workload)
	}
	writeFile(t, filepath.Join(dir, "web-0.yaml"), cacheWebWorkload)
	after, err := d.Mesh()
	if err != nil {
		t.Fatal(err)
	}
	if got := after.Services[1].Endpoints[0].Workload.Node; got != "node-a" {
		t.Fatalf("after: web's endpoint is on node %q, want node-a", got)
	}
	if got := web.Endpoints[0].Workload.Node; got != "" {
		t.Errorf("the later read moved the earlier mesh's web endpoint to node %q", got)
	}
	if before.Services[1] != web {
		t.Errorf("the later read changed the earlier mesh's services")
	}
}

// TestDirConcurrentReads: reads of one Dir may run at once while its files
// change (run with -race): each returns one of the meshes the directory
// held, whole.
func TestDirConcurrentReads(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "services.yaml")
	addresses := []string{"10.0.0.1", "10.0.0.2", "10.0.0.3"}
	write := func(i int) {
		writeFile(t, filepath.Join(dir, ".tmp"), strings.Replace(cacheServices, "10.0.0.1", addresses[i%len(addresses)], 1))
		if err := os.Rename(filepath.Join(dir, ".tmp"), path); err != nil {
			t.Error(err)
		}
	}
	write(0)
	d := &mesh.Dir{Path: dir}
	done := make(chan error)
	for range 4 {
		go func() {
			var err error
			for range 25 {
				var m *mesh.Mesh
				if m, err = d.Mesh(); err != nil {
					break
				}
				if len(m.Services) != 2 || !slices.Contains(addresses, m.Services[1].Endpoints[0].Address) {
					err = fmt.Errorf("read %d services, web at %v", len(m.Services), m.Services[1].Endpoints)
					break
				}
			}
			done <- err
		}()
	}
	for i := range 30 {
		write(i)
	}
	for range 4 {
		if err := <-done; err != nil {
			t.Error(err)
		}
	}
}

// TestDirMeshIsSorted: a mesh read from files whose keys interleave is in
// Sort's order, on a first read and on one that takes every file from the
// cache.
func TestDirMeshIsSorted(t *testing.T) {
	dir := t.TempDir()
	workload := func(name string) string {
		return "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Workload\nmetadata: {name: " + name +
			", namespace: shop}\nspec: {spiffeID: spiffe://cluster.local/ns/shop/sa/client}\n---\n"
	}
	writeFile(t, filepath.Join(dir, "a.yaml"), workload("client-3")+workload("client-10")+workload("client-1"))
	writeFile(t, filepath.Join(dir, "b.yaml"), workload("client-2")+workload("client-0"))
	writeFile(t, filepath.Join(dir, "services.yaml"), cacheServices)
	d := &mesh.Dir{Path: dir}
	for _, read := range []string{"first", "cached"} {
		m, err := d.Mesh()
		if err != nil {
			t.Fatal(err)
		}
		if got := workloadNames(m); got != "client-0,client-1,client-10,client-2,client-3" {
			t.Errorf("%s read: workloads %s", read, got)
		}
		if got := m.Services[0].Name + "," + m.Services[1].Name; got != "db,web" {
			t.Errorf("%s read: services %s", read, got)
		}
	}
}
