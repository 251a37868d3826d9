package mesh_test

import (
	"errors"
	"net/netip"
	"reflect"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/mesh"
)

const ambientFile = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: echo, namespace: demo}
spec:
  ports: [{name: tcp, port: 7000, protocol: TCP}]
  endpoints:
  - {address: 10.0.1.2, pod: echo-0, spiffeID: spiffe://cluster.local/ns/demo/sa/echo, labels: {app: echo}}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: echo-0, namespace: demo}
spec:
  spiffeID: spiffe://cluster.local/ns/demo/sa/echo
  labels: {app: echo}
  node: node-a
  addresses: [10.0.1.2, "fd00::1:2"]
  dataplaneMode: ambient
  netns: echo-0
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: curl-0, namespace: demo}
spec:
  spiffeID: spiffe://cluster.local/ns/demo/sa/curl
  node: node-b
  addresses: [10.0.2.2]
  dataplaneMode: ambient
  netns: /run/netns/curl-0
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: legacy-0, namespace: demo}
spec:
  spiffeID: spiffe://cluster.local/ns/demo/sa/legacy
  node: node-b
  addresses: [10.0.2.3]
  dataplaneMode: none
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: web-0, namespace: demo}
spec:
  spiffeID: spiffe://cluster.local/ns/demo/sa/web
`

// TestAmbientWorkloadFile: the kind Workload's node, addresses,
// dataplaneMode and netns reach the model; a Workload without a mode is a
// sidecar, as every file workload was before; the service endpoint of a
// pod that a Workload describes is that workload, so that the endpoint is
// ambient too; WorkloadByAddress finds workloads by either family.
func TestAmbientWorkloadFile(t *testing.T) {
	m, err := readDir(t, map[string]string{"ambient.yaml": ambientFile})
	if err != nil {
		t.Fatal(err)
	}
	if err := m.Validate(td); err != nil {
		t.Fatal(err)
	}
	echo := m.Workload("demo", "echo-0")
	want := &mesh.Workload{Namespace: "demo", Name: "echo-0", ServiceAccount: "echo",
		ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo"), Labels: map[string]string{"app": "echo"},
		Node: "node-a", Addresses: []string{"10.0.1.2", "fd00::1:2"}, DataPlaneMode: mesh.DataPlaneAmbient, Netns: "echo-0"}
	if !reflect.DeepEqual(echo, want) {
		t.Errorf("echo-0 = %+v, want %+v", echo, want)
	}
	if ep := m.Service("demo/echo").Endpoints[0].Workload; ep != echo {
		t.Errorf("the endpoint's workload is %+v, not the Workload document's", ep)
	}
	if got := m.Workload("demo", "web-0").Mode(); got != mesh.DataPlaneSidecar {
		t.Errorf("web-0 without a mode is %q, want sidecar", got)
	}
	if got := m.Workload("demo", "legacy-0").Mode(); got != mesh.DataPlaneNone {
		t.Errorf("legacy-0 is %q, want none", got)
	}
	for addr, key := range map[string]string{"10.0.1.2": "demo/echo-0", "fd00::1:2": "demo/echo-0", "::ffff:10.0.2.2": "demo/curl-0",
		"10.0.2.3": "demo/legacy-0", "10.0.9.9": ""} {
		w := m.WorkloadByAddress(netip.MustParseAddr(addr))
		switch {
		case key == "" && w != nil:
			t.Errorf("%s finds %s, want nothing", addr, w.Key())
		case key != "" && (w == nil || w.Key() != key):
			t.Errorf("%s finds %v, want %s", addr, w, key)
		}
	}
	if got := m.WorkloadsOnNode("node-b"); len(got) != 2 {
		t.Errorf("node-b runs %d workloads, want curl-0 and legacy-0", len(got))
	}
}

// TestAmbientWorkloadFileRefused: a bad dataplane mode, an unknown field,
// and an ambient workload serving at an address it does not list refuse
// the directory with the reason.
func TestAmbientWorkloadFileRefused(t *testing.T) {
	for name, tc := range map[string]struct{ edit, want string }{
		"mode": {`dataplaneMode: ambient
  netns: echo-0`, `dataplaneMode: "waypoint" is not ambient, sidecar or none`},
		"field":    {`netns: echo-0`, `unknown field "netnsPath"`},
		"endpoint": {`addresses: [10.0.1.2, "fd00::1:2"]`, `endpoint 10.0.1.2 of ambient workload demo/echo-0 is not among its addresses [10.0.1.3]`},
	} {
		t.Run(name, func(t *testing.T) {
			repl := map[string]string{
				"mode":     "dataplaneMode: waypoint\n  netns: echo-0",
				"field":    "netnsPath: echo-0",
				"endpoint": "addresses: [10.0.1.3]",
			}[name]
			data := strings.Replace(ambientFile, tc.edit, repl, 1)
			if data == ambientFile {
				t.Fatal("the edit changed nothing")
			}
			_, err := readDir(t, map[string]string{"ambient.yaml": data})
			if !errors.Is(err, mesh.ErrFile) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want ErrFile with %q", err, tc.want)
			}
		})
	}
}

// TestValidateDataPlane: Validate refuses addresses that do not parse or
// that two workloads claim, an ambient workload off Kubernetes without a
// node or netns, a netns on a workload the node proxy does not capture, a
// bad netns, node name or mode; a Kubernetes pod (a UID) that is not
// scheduled yet is valid without them.
func TestValidateDataPlane(t *testing.T) {
	wl := func(name string, edit func(*mesh.Workload)) *mesh.Workload {
		w := &mesh.Workload{Namespace: "demo", Name: name, ServiceAccount: name,
			ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/" + name), Node: "node-a",
			Addresses: []string{"10.0.0.1"}, DataPlaneMode: mesh.DataPlaneAmbient, Netns: name}
		if edit != nil {
			edit(w)
		}
		return w
	}
	ok := &mesh.Mesh{Workloads: []*mesh.Workload{wl("a", nil), wl("b", func(w *mesh.Workload) { w.Addresses = []string{"10.0.0.2", "fd00::2"} }),
		wl("pending", func(w *mesh.Workload) { w.Node, w.Netns, w.Addresses, w.UID = "", "", nil, "4f1c" }),
		wl("plain", func(w *mesh.Workload) { w.Netns, w.DataPlaneMode, w.Addresses = "", "", nil })}}
	if err := ok.Validate(td); err != nil {
		t.Fatalf("valid mesh refused: %v", err)
	}
	for name, tc := range map[string]struct {
		edit func(*mesh.Workload)
		want string
	}{
		"bad address":    {func(w *mesh.Workload) { w.Addresses = []string{"10.0.0.300"} }, `address "10.0.0.300"`},
		"zone":           {func(w *mesh.Workload) { w.Addresses = []string{"fe80::1%eth0"} }, "not a unicast address without a zone"},
		"shared address": {func(w *mesh.Workload) { w.Addresses = []string{"::ffff:10.0.0.1"} }, "address 10.0.0.1 is also workload demo/a's"},
		"no node":        {func(w *mesh.Workload) { w.Node = "" }, "is ambient but names no node"},
		"no netns":       {func(w *mesh.Workload) { w.Netns = "" }, "is ambient but names no netns"},
		"netns not ambient": {func(w *mesh.Workload) { w.DataPlaneMode = mesh.DataPlaneSidecar },
			`netns "x" is for ambient workloads, which the node proxy captures; this one is sidecar`},
		"bad netns": {func(w *mesh.Workload) { w.Netns = "a/b" }, "a namespace name has no slash"},
		"bad node":  {func(w *mesh.Workload) { w.Node = "Node_A" }, `node "Node_A"`},
		"bad mode":  {func(w *mesh.Workload) { w.DataPlaneMode = "waypoint" }, `dataplane mode "waypoint"`},
		"disagreeing declarations": {func(w *mesh.Workload) {
			w.Name, w.ServiceAccount, w.ID, w.Node = "a", "a", ok.Workloads[0].ID, "node-b"
		},
			"workload demo/a is declared twice with different identities, labels, nodes, addresses or dataplane modes"},
	} {
		t.Run(name, func(t *testing.T) {
			bad := wl("x", func(w *mesh.Workload) { w.Addresses = []string{"10.0.0.9"} })
			tc.edit(bad)
			m := &mesh.Mesh{Workloads: []*mesh.Workload{ok.Workloads[0], bad}}
			err := m.Validate(td)
			if !errors.Is(err, mesh.ErrInvalid) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("error %v, want ErrInvalid with %q", err, tc.want)
			}
		})
	}
}
