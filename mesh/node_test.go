package mesh_test

import (
	"errors"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/mesh"
)

const nodeFile = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: node-a}
spec:
  workloads:
  - spiffeID: spiffe://cluster.local/ns/demo/sa/web
    selectors: {uid: 1001}
  - spiffeID: spiffe://cluster.local/ns/demo/sa/db
    selectors:
      uid: 0
      gid: 70
      path: /usr/bin/postgres
      sha256: 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef
      netns: demo-db
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Node
metadata: {name: node-b}
spec:
  workloads:
  - spiffeID: spiffe://cluster.local/ns/demo/sa/web
    selectors: {netns: /var/run/netns/web}
`

func readDir(t *testing.T, files map[string]string) (*mesh.Mesh, error) {
	t.Helper()
	dir := t.TempDir()
	for name, data := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return (&mesh.Dir{Path: dir}).Mesh()
}

// TestNodeFile: the kind Node becomes Mesh.Nodes, with its selectors in
// the node service's "type:value" form, and Mesh.Node finds it.
func TestNodeFile(t *testing.T) {
	m, err := readDir(t, map[string]string{"nodes.yaml": nodeFile})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Validate(td); err != nil {
		t.Fatal(err)
	}
	want := []mesh.NodeWorkload{
		{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/web"), Selectors: []string{"unix:uid:1001"}},
		{ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/db"), Selectors: []string{
			"unix:uid:0", "unix:gid:70", "unix:path:/usr/bin/postgres",
			"unix:sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef", "netns:demo-db",
		}},
	}
	a := m.Node("node-a")
	if a == nil || !reflect.DeepEqual(a.Workloads, want) {
		t.Fatalf("Node(node-a) = %+v, want workloads %+v", a, want)
	}
	if b := m.Node("node-b"); b == nil || len(b.Workloads) != 1 || b.Workloads[0].Selectors[0] != "netns:/var/run/netns/web" {
		t.Fatalf("Node(node-b) = %+v", b)
	}
	if m.Node("node-c") != nil || len(m.WorkloadsOnNode("node-a")) != 0 {
		t.Fatal("an undeclared node was found, or a file-declared node has pods")
	}
}

// TestNodeFileRefused: every bad Node is a clear error that refuses the
// directory (or fails Validate, for what needs the trust domain), never a
// node with fewer or looser selectors.
func TestNodeFileRefused(t *testing.T) {
	doc := func(name, workloads string) string {
		return "apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Node\nmetadata: {name: " + name + "}\nspec:\n  workloads:\n" + workloads
	}
	web := "  - spiffeID: spiffe://cluster.local/ns/demo/sa/web\n"
	cases := map[string]struct {
		file string
		want string // in the error
	}{
		"no selector":         {doc("node-a", web+"    selectors: {}\n"), "at least one of uid, gid, path, sha256, netns"},
		"selectors left out":  {doc("node-a", web), "at least one of uid, gid, path, sha256, netns"},
		"unknown selector":    {doc("node-a", web+"    selectors: {user: web}\n"), `unknown field "user"`},
		"unknown field":       {doc("node-a", web+"    selectors: {uid: 1}\n    labels: {a: b}\n"), `unknown field "labels"`},
		"relative path":       {doc("node-a", web+"    selectors: {path: bin/web}\n"), "absolute"},
		"unclean path":        {doc("node-a", web+"    selectors: {path: /usr/../bin/web}\n"), "absolute, clean"},
		"short sha256":        {doc("node-a", web+"    selectors: {sha256: abc}\n"), "64 lower-case hex"},
		"upper-case sha256":   {doc("node-a", web+"    selectors: {sha256: 0123456789ABCDEF0123456789abcdef0123456789abcdef0123456789abcdef}\n"), "64 lower-case hex"},
		"negative uid":        {doc("node-a", web+"    selectors: {uid: -1}\n"), "uid"},
		"uid as text":         {doc("node-a", web+"    selectors: {uid: web}\n"), "uid"},
		"netns with a slash":  {doc("node-a", web+"    selectors: {netns: a/b}\n"), "no slash"},
		"bad spiffeID":        {doc("node-a", "  - spiffeID: web\n    selectors: {uid: 1}\n"), "spiffeID"},
		"namespaced":          {strings.Replace(doc("node-a", web+"    selectors: {uid: 1}\n"), "{name: node-a}", "{name: node-a, namespace: demo}", 1), "no namespace"},
		"name not DNS-1123":   {doc("Node_A", web+"    selectors: {uid: 1}\n"), "Node_A"},
		"declared twice":      {doc("node-a", web+"    selectors: {uid: 1}\n") + "---\n" + doc("node-a", web+"    selectors: {uid: 2}\n"), "node node-a is declared twice"},
		"no workloads":        {"apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Node\nmetadata: {name: node-a}\nspec: {}\n", "lists no workloads"},
		"other trust domain":  {doc("node-a", "  - spiffeID: spiffe://evil.example/ns/demo/sa/web\n    selectors: {uid: 1}\n"), "not in trust domain"},
		"a node's identity":   {doc("node-a", "  - spiffeID: spiffe://cluster.local/node/node-b\n    selectors: {uid: 1}\n"), "not a workload identity"},
		"the trust domain ID": {doc("node-a", "  - spiffeID: spiffe://cluster.local\n    selectors: {uid: 1}\n"), "not a workload identity"},
		// An executable alone does not tell local users apart (review15-sec F2).
		"path alone":     {doc("node-a", web+"    selectors: {path: /usr/bin/true}\n"), "needs a uid or gid"},
		"sha256 alone":   {doc("node-a", web+"    selectors: {sha256: "+strings.Repeat("ab", 32)+"}\n"), "needs a uid or gid"},
		"path and netns": {doc("node-a", web+"    selectors: {path: /usr/bin/web, netns: web}\n"), "needs a uid or gid"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			m, err := readDir(t, map[string]string{"nodes.yaml": tc.file})
			if err == nil {
				err = m.Validate(td)
			}
			if !errors.Is(err, mesh.ErrFile) && !errors.Is(err, mesh.ErrInvalid) {
				t.Fatalf("error = %v, want ErrFile or ErrInvalid", err)
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error = %v, want one containing %q", err, tc.want)
			}
		})
	}
}

// TestWorkloadsOnNode: pods by spec.nodeName, endpoints and other
// workloads alike, each once.
func TestWorkloadsOnNode(t *testing.T) {
	m := valid()
	m.Services[0].Endpoints[0].Workload.Node = "node-a"
	other := &mesh.Workload{Namespace: "a", Name: "client", ServiceAccount: "sa", ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/a/sa/sa"), Node: "node-b"}
	m.Workloads = []*mesh.Workload{m.Services[0].Endpoints[0].Workload, other}
	if got := m.WorkloadsOnNode("node-a"); len(got) != 1 || got[0].Name != "pod" {
		t.Fatalf("WorkloadsOnNode(node-a) = %v", got)
	}
	if got := m.WorkloadsOnNode("node-b"); len(got) != 1 || got[0] != other {
		t.Fatalf("WorkloadsOnNode(node-b) = %v", got)
	}
	if got := m.WorkloadsOnNode(""); got != nil {
		t.Fatalf("WorkloadsOnNode(\"\") = %v: unscheduled pods are on no node", got)
	}
}

// TestFeedPublishesNodeChanges: a change to a Node file alone is a new
// snapshot, else a node would keep identities its file no longer lists.
func TestFeedPublishesNodeChanges(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "nodes.yaml")
	if err := os.WriteFile(path, []byte(nodeFile), 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := mesh.NewFeed(mesh.FeedConfig{Source: &mesh.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	first, err := f.Load()
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(strings.Replace(nodeFile, "uid: 1001", "uid: 1002", 1)), 0o600); err != nil {
		t.Fatal(err)
	}
	next, err := f.Load()
	if err != nil {
		t.Fatal(err)
	}
	if next.Version == first.Version || next.Mesh.Node("node-a").Workloads[0].Selectors[0] != "unix:uid:1002" {
		t.Fatalf("a changed Node file published version %d after %d, selectors %v", next.Version, first.Version, next.Mesh.Node("node-a").Workloads[0].Selectors)
	}
}
