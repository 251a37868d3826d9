package xds_test

import (
	"context"
	"encoding/json"
	"errors"
	"slices"
	"sort"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	ambientv1 "github.com/trustmesh/trustmesh/api/ambient/v1"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

// ambientMesh has two ambient workloads on two nodes, a sidecar, a pod of
// mode none on each node and a Kubernetes pod not scheduled yet.
func ambientMesh() *mesh.Mesh {
	wl := func(name, node string, mode mesh.DataPlaneMode, netns string, addrs ...string) *mesh.Workload {
		return &mesh.Workload{Namespace: "demo", Name: name, ServiceAccount: name,
			ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/" + name), Labels: map[string]string{"app": name},
			Node: node, Addresses: addrs, DataPlaneMode: mode, Netns: netns}
	}
	pending := wl("pending", "", mesh.DataPlaneAmbient, "")
	pending.UID = "5a1e"
	return &mesh.Mesh{Workloads: []*mesh.Workload{
		wl("echo", "node-a", mesh.DataPlaneAmbient, "echo", "10.0.1.2", "fd00::1:2"),
		wl("curl", "node-b", mesh.DataPlaneAmbient, "/run/netns/curl", "10.0.2.2"),
		wl("web", "node-a", mesh.DataPlaneSidecar, "", "10.0.1.3"),
		wl("legacy", "node-a", mesh.DataPlaneNone, "", "10.0.1.4"),
		wl("other", "node-b", mesh.DataPlaneNone, "", "10.0.2.4"),
		pending,
	}}
}

func nodeProxy(ip, name string) *corev3.Node {
	return &corev3.Node{Id: ambientv1.NodeIDPrefix + ip + "~" + name + "~cluster.local"}
}

func nodeID(name string) spiffeid.ID {
	return spiffeid.RequireFromString("spiffe://cluster.local/node/" + name)
}

// nodeDelta is a node proxy's delta ADS stream that acknowledges every
// response, as the node proxy does.
type nodeDelta struct {
	t testing.TB
	s discoveryv3.AggregatedDiscoveryService_DeltaAggregatedResourcesClient
}

func (e *env) deltaNode(cert *workloadCert, node *corev3.Node) *nodeDelta {
	e.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	e.t.Cleanup(cancel)
	s, err := e.dialADS(cert).DeltaAggregatedResources(ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	for _, typ := range []string{ambientv1.WorkloadType, ambientv1.AuthorizationType} {
		if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: typ}); err != nil {
			e.t.Fatal(err)
		}
	}
	return &nodeDelta{t: e.t, s: s}
}

// recv returns the next response and acknowledges it.
func (c *nodeDelta) recv() *discoveryv3.DeltaDiscoveryResponse {
	c.t.Helper()
	resp, err := c.s.Recv()
	if err != nil {
		c.t.Fatal(err)
	}
	if err := c.s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resp.GetTypeUrl(), ResponseNonce: resp.GetNonce()}); err != nil {
		c.t.Fatal(err)
	}
	return resp
}

// workloads decodes the Workloads of a response by name.
func workloads(t testing.TB, resp *discoveryv3.DeltaDiscoveryResponse) map[string]*ambientv1.Workload {
	t.Helper()
	out := map[string]*ambientv1.Workload{}
	for _, r := range resp.GetResources() {
		w := &ambientv1.Workload{}
		if r.GetResource().GetTypeUrl() != ambientv1.WorkloadType {
			t.Fatalf("resource %s has type %s", r.GetName(), r.GetResource().GetTypeUrl())
		}
		if err := anypb.UnmarshalTo(r.GetResource(), w, proto.UnmarshalOptions{}); err != nil {
			t.Fatal(err)
		}
		if w.GetUid() != r.GetName() {
			t.Fatalf("resource %s holds workload %s", r.GetName(), w.GetUid())
		}
		out[r.GetName()] = w
	}
	return out
}

func revision(t testing.TB, resp *discoveryv3.DeltaDiscoveryResponse) string {
	t.Helper()
	if len(resp.GetResources()) != 1 || resp.GetResources()[0].GetName() != ambientv1.AuthorizationName {
		t.Fatalf("authorization response %v, want the one resource %q", resp.GetResources(), ambientv1.AuthorizationName)
	}
	a := &ambientv1.Authorization{}
	if err := resp.GetResources()[0].GetResource().UnmarshalTo(a); err != nil {
		t.Fatal(err)
	}
	return a.GetRevision()
}

// first receives the first response of both types.
func (c *nodeDelta) first() (map[string]*ambientv1.Workload, string) {
	c.t.Helper()
	var ws map[string]*ambientv1.Workload
	rev := ""
	for range 2 {
		resp := c.recv()
		switch resp.GetTypeUrl() {
		case ambientv1.WorkloadType:
			ws = workloads(c.t, resp)
		case ambientv1.AuthorizationType:
			rev = revision(c.t, resp)
		default:
			c.t.Fatalf("response of type %s", resp.GetTypeUrl())
		}
	}
	return ws, rev
}

func keys[V any](m map[string]V) []string {
	out := make([]string, 0, len(m))
	for k := range m {
		out = append(out, k)
	}
	sort.Strings(out)
	return out
}

// TestNodeProxyConfig: a node proxy, over delta ADS with its node SVID,
// gets every ambient and sidecar workload and the pods of mode none on its
// own node only, with the policy snapshot's version as the Authorization
// revision; a policy change sends the new revision and nothing else; a
// mesh change sends the workloads it changed and removes those gone.
func TestNodeProxyConfig(t *testing.T) {
	ps := parsePolicies(t, `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-curl, namespace: demo}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules: [{from: [{source: {principals: [cluster.local/ns/demo/sa/curl]}}]}]
`)
	e := start(t, ambientMesh(), ps)
	c := e.deltaNode(e.mint(nodeID("node-a")), nodeProxy("192.168.0.1", "node-a"))
	ws, rev := c.first()
	if got, want := keys(ws), []string{"5a1e", "demo/curl", "demo/echo", "demo/legacy", "demo/web"}; !slices.Equal(got, want) {
		t.Fatalf("node-a got workloads %v, want %v (not node-b's pod of mode none)", got, want)
	}
	want := &ambientv1.Workload{Uid: "demo/echo", Name: "echo", Namespace: "demo", ServiceAccount: "echo",
		SpiffeId: "spiffe://cluster.local/ns/demo/sa/echo", Node: "node-a", Addresses: []string{"10.0.1.2", "fd00::1:2"},
		Labels: map[string]string{"app": "echo"}, Mode: ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT, Netns: "echo"}
	if !proto.Equal(ws["demo/echo"], want) {
		t.Errorf("echo = %v, want %v", ws["demo/echo"], want)
	}
	for name, mode := range map[string]ambientv1.DataPlaneMode{"demo/web": ambientv1.DataPlaneMode_DATA_PLANE_MODE_SIDECAR,
		"demo/legacy": ambientv1.DataPlaneMode_DATA_PLANE_MODE_NONE, "5a1e": ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT} {
		if got := ws[name].GetMode(); got != mode {
			t.Errorf("%s has mode %s, want %s", name, got, mode)
		}
	}
	if want := "0"; rev != want {
		t.Errorf("revision %q, want the policy feed's version %q", rev, want)
	}

	// A policy change: the new revision, and no workload.
	e.push(nil, ps)
	resp := c.recv()
	if resp.GetTypeUrl() != ambientv1.AuthorizationType {
		t.Fatalf("after a policy change the node got %s %v, want the Authorization alone", resp.GetTypeUrl(), resp.GetResources())
	}
	if got := revision(t, resp); got != "1" {
		t.Fatalf("revision %q after the policy change, want 1", got)
	}

	// A mesh change: echo moves to another address, curl goes away.
	m := ambientMesh()
	m.Workloads[0].Addresses = []string{"10.0.1.9"}
	m.Workloads = slices.Delete(m.Workloads, 1, 2)
	e.push(m, nil)
	resp = c.recv()
	if resp.GetTypeUrl() != ambientv1.WorkloadType {
		t.Fatalf("after a mesh change the node got %s, want Workloads", resp.GetTypeUrl())
	}
	ws = workloads(t, resp)
	if got := keys(ws); !slices.Equal(got, []string{"demo/echo"}) || !slices.Equal(ws["demo/echo"].GetAddresses(), []string{"10.0.1.9"}) {
		t.Errorf("changed workloads %v (%v), want echo alone at 10.0.1.9", got, ws["demo/echo"].GetAddresses())
	}
	if got := resp.GetRemovedResources(); !slices.Equal(got, []string{"demo/curl"}) {
		t.Errorf("removed %v, want [demo/curl]", got)
	}

	// The node proxy shows among the clients, under its node SVID, and in
	// the metrics.
	if got := e.gauge("trustmesh_xds_connected_proxies"); got != 1 {
		t.Errorf("trustmesh_xds_connected_proxies = %v, want 1", got)
	}
	if got := e.counter("trustmesh_xds_pushes_total", ambientv1.WorkloadType); got != 2 {
		t.Errorf("trustmesh_xds_pushes_total{type=Workload} = %v, want 2", got)
	}
	cl := e.srv.Clients().Clients
	if len(cl) != 1 || cl[0].NodeID != "node~192.168.0.1~node-a~cluster.local" || cl[0].SPIFFEID != "spiffe://cluster.local/node/node-a" || !cl[0].Delta {
		t.Errorf("clients %+v, want the node proxy on a delta stream", cl)
	}
}

// firstAmbient opens a stream as a node proxy would and returns the number
// of workloads in its first answer, or the stream's error.
func firstAmbient(t *testing.T, c discoveryv3.AggregatedDiscoveryServiceClient, delta bool, node *corev3.Node) (int, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if delta {
		s, err := c.DeltaAggregatedResources(ctx)
		if err != nil {
			return 0, err
		}
		_ = s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: node, TypeUrl: ambientv1.WorkloadType})
		resp, err := s.Recv()
		return len(resp.GetResources()), err
	}
	s, err := c.StreamAggregatedResources(ctx)
	if err != nil {
		return 0, err
	}
	_ = s.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: ambientv1.WorkloadType})
	resp, err := s.Recv()
	return len(resp.GetResources()), err
}

// TestNodeProxyIdentity: a node proxy must present its own node SVID, over
// state of the world as over delta: a node id naming another node, a
// workload's certificate for a node id and a node's certificate for a
// workload's node id are refused, as is a malformed node proxy id, and an
// Envoy sidecar of an ambient pod, which its node proxy captures.
func TestNodeProxyIdentity(t *testing.T) {
	e := start(t, ambientMesh(), nil)
	nodeA := e.mint(nodeID("node-a"))
	web := e.mint(spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/web"))
	webSidecar := meshtest.Node("sidecar", "10.0.1.3", ambientMesh().Workloads[2], false)
	cases := []struct {
		name string
		cert *workloadCert
		node *corev3.Node
		want codes.Code
	}{
		{"own node", nodeA, nodeProxy("192.168.0.1", "node-a"), codes.OK},
		{"another node's id", nodeA, nodeProxy("192.168.0.2", "node-b"), codes.PermissionDenied},
		{"a workload's certificate", web, nodeProxy("192.168.0.1", "node-a"), codes.PermissionDenied},
		{"a node's certificate for a sidecar", nodeA, webSidecar, codes.PermissionDenied},
		{"an ambient pod's sidecar", e.mint(ambientMesh().Workloads[0].ID), meshtest.Node("sidecar", "10.0.1.2", ambientMesh().Workloads[0], false), codes.PermissionDenied},
		{"a node SVID with more segments", e.mint(spiffeid.RequireFromString("spiffe://cluster.local/node/node-a/x")), nodeProxy("192.168.0.1", "node-a"), codes.PermissionDenied},
		{"no certificate", nil, nodeProxy("192.168.0.1", "node-a"), codes.Unauthenticated},
		{"malformed IP", nodeA, &corev3.Node{Id: "node~node-a~node-a~cluster.local"}, codes.InvalidArgument},
		{"malformed name", nodeA, &corev3.Node{Id: "node~192.168.0.1~Node_A~cluster.local"}, codes.InvalidArgument},
		{"too few fields", nodeA, &corev3.Node{Id: "node~192.168.0.1~node-a"}, codes.InvalidArgument},
	}
	for _, tc := range cases {
		for _, delta := range []bool{false, true} {
			t.Run(tc.name+map[bool]string{false: "/sotw", true: "/delta"}[delta], func(t *testing.T) {
				n, err := firstAmbient(t, e.dialADS(tc.cert), delta, tc.node)
				if got := status.Code(err); got != tc.want {
					t.Fatalf("code = %s (%v), want %s", got, err, tc.want)
				}
				if tc.want == codes.OK && n != 5 {
					t.Fatalf("%d workloads in the first answer, want 5", n)
				}
			})
		}
	}
	// The sidecar itself still connects with its certificate.
	if _, err := firstResponse(t, e.dialADS(web), true, webSidecar); err != nil {
		t.Fatalf("the sidecar's own stream: %v", err)
	}
}

// counter is the value of one of the server's counters with the label type.
func (e *env) counter(name, typ string) float64 {
	e.t.Helper()
	mfs, err := e.reg.Gather()
	if err != nil {
		e.t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, m := range mf.GetMetric() {
			for _, l := range m.GetLabel() {
				if l.GetName() == "type" && l.GetValue() == typ {
					return m.GetCounter().GetValue()
				}
			}
		}
	}
	return 0
}

// TestNodeProxyConfigLeavesOutABadWorkload: a workload that cannot be sent
// (a label that is not UTF-8) is left out, and the node proxies still get
// every other workload.
func TestNodeProxyConfigLeavesOutABadWorkload(t *testing.T) {
	m := ambientMesh()
	m.Workloads[1].Labels = map[string]string{"app": "\xff"}
	e := start(t, m, nil)
	ws, _ := e.deltaNode(e.mint(nodeID("node-a")), nodeProxy("192.168.0.1", "node-a")).first()
	if got, want := keys(ws), []string{"5a1e", "demo/echo", "demo/legacy", "demo/web"}; !slices.Equal(got, want) {
		t.Fatalf("workloads %v, want %v without curl", got, want)
	}
}

// TestDumpNodeProxy: `trustmesh xds dump` of a node proxy's id prints the
// Workloads that node's proxy is sent, by name, as the server sends them;
// a malformed node proxy id is refused.
func TestDumpNodeProxy(t *testing.T) {
	out, err := xds.Dump(xds.DumpRequest{Mesh: mesh.Static{M: ambientMesh()}, Proxy: testProxy(), NodeID: "node~192.168.0.2~node-b~cluster.local"})
	if err != nil {
		t.Fatal(err)
	}
	var got struct {
		Node      string            `json:"node"`
		Workloads []json.RawMessage `json:"workloads"`
	}
	if err := json.Unmarshal(out, &got); err != nil {
		t.Fatalf("%v in\n%s", err, out)
	}
	var uids []string
	for _, raw := range got.Workloads {
		w := &ambientv1.Workload{}
		if err := protojson.Unmarshal(raw, w); err != nil {
			t.Fatal(err)
		}
		uids = append(uids, w.GetUid())
		if w.GetUid() == "demo/curl" && (w.GetNetns() != "/run/netns/curl" || w.GetMode() != ambientv1.DataPlaneMode_DATA_PLANE_MODE_AMBIENT) {
			t.Errorf("curl dumped as %v", w)
		}
	}
	if want := []string{"5a1e", "demo/curl", "demo/echo", "demo/other", "demo/web"}; got.Node != "node~192.168.0.2~node-b~cluster.local" || !slices.Equal(uids, want) {
		t.Fatalf("dump of node %s: %v, want %v\n%s", got.Node, uids, want, out)
	}
	if _, err := xds.Dump(xds.DumpRequest{Mesh: mesh.Static{M: ambientMesh()}, Proxy: testProxy(), NodeID: "node~x~node-b~cluster.local"}); !errors.Is(err, proxyconfig.ErrNodeID) {
		t.Fatalf("a malformed node proxy id: %v, want ErrNodeID", err)
	}
}
