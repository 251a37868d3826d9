package xds_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	endpointv3 "github.com/envoyproxy/go-control-plane/envoy/config/endpoint/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/internal/meshtest"
)

const meshFile = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: a, namespace: ns-a}
spec:
  ports: [{name: http, port: 80, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.1, pod: pod-a, spiffeID: spiffe://cluster.local/ns/ns-a/sa/sa-a}
%s
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: b, namespace: ns-a}
spec:
  ports: [{name: http, port: 80, protocol: HTTP}]
  endpoints:
  - {address: 10.0.0.2, pod: pod-b, spiffeID: spiffe://cluster.local/ns/ns-a/sa/sa-b}
`

// TestMeshDirChangesAreDebouncedAndIncremental edits a --mesh directory
// under a running server: nothing is pushed until the debounce period has
// passed on the server's clock; then a delta client receives only the
// endpoints that changed. A broken edit is refused and the last good mesh
// stays.
func TestMeshDirChangesAreDebouncedAndIncremental(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "mesh.yaml")
	write := func(s string) {
		t.Helper()
		tmp := path + ".tmp"
		if err := os.WriteFile(tmp, []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(tmp, path); err != nil {
			t.Fatal(err)
		}
	}
	write(strings.Replace(meshFile, "%s", "", 1))
	e := startWith(t, &mesh.Dir{Path: dir})

	a := &mesh.Workload{Namespace: "ns-a", Name: "pod-a", ServiceAccount: "sa-a", ID: spiffeid.RequireFromString("spiffe://cluster.local/ns/ns-a/sa/sa-a")}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	s, err := e.dialADS(e.mint(a.ID)).DeltaAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{Node: meshtest.Node("sidecar", "10.0.0.1", a, false), TypeUrl: resource.EndpointType}); err != nil {
		t.Fatal(err)
	}
	first, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(first.GetResources()) != 2 {
		t.Fatalf("first response has %d endpoint resources, want 2", len(first.GetResources()))
	}
	if err := s.Send(&discoveryv3.DeltaDiscoveryRequest{TypeUrl: resource.EndpointType, ResponseNonce: first.GetNonce()}); err != nil {
		t.Fatal(err)
	}

	before := e.srv.Pushes()
	write(strings.Replace(meshFile, "%s", "  - {address: 10.0.0.3, pod: pod-a2, spiffeID: spiffe://cluster.local/ns/ns-a/sa/sa-a}", 1))
	waitForTimer(t, e)
	if got := e.srv.Pushes(); got != before {
		t.Fatalf("pushed before the debounce period passed (%d pushes, want %d)", got, before)
	}
	e.stepUntilPush(before)
	resp, err := s.Recv()
	if err != nil {
		t.Fatal(err)
	}
	if len(resp.GetResources()) != 1 || resp.GetResources()[0].GetName() != "outbound|80||a.ns-a.svc.cluster.local" {
		t.Fatalf("delta response = %v, want only service a's endpoints", names(resp))
	}
	cla := &endpointv3.ClusterLoadAssignment{}
	if err := resp.GetResources()[0].GetResource().UnmarshalTo(cla); err != nil {
		t.Fatal(err)
	}
	if n := len(cla.GetEndpoints()[0].GetLbEndpoints()); n != 2 {
		t.Fatalf("service a has %d endpoints, want 2", n)
	}

	// A broken file is refused; the server keeps the last good mesh.
	before = e.srv.Pushes()
	write("apiVersion: mesh.trustmesh.io/v1alpha1\nkind: Service\nmetadata: {name: a}\nspec: {nonsense: 1}\n")
	e.stepUntilPush(before)
	res, err := e.srv.Resources(meshtest.Node("sidecar", "10.0.0.1", a, false))
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Endpoints) != 2 {
		t.Fatalf("after a broken edit the node has %d endpoint resources, want the last good 2", len(res.Endpoints))
	}
}

func names(resp *discoveryv3.DeltaDiscoveryResponse) []string {
	var out []string
	for _, r := range resp.GetResources() {
		out = append(out, r.GetName())
	}
	return out
}

func waitForTimer(t *testing.T, e *env) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !e.xclock.HasWaiters() {
		if time.Now().After(deadline) {
			t.Fatal("the change started no debounce timer")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestRunFailsOnABadFirstMesh: a server that cannot load its first mesh
// returns the error instead of serving nothing.
func TestRunFailsOnABadFirstMesh(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte("kind: Nonsense\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	srv, err := xds.New(xds.Config{Bundle: fakeBundle{}, Mesh: &mesh.Dir{Path: dir}, Proxy: testProxy(), Log: testLog()})
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Run(context.Background()); !errors.Is(err, xds.ErrMesh) || !errors.Is(err, mesh.ErrFile) {
		t.Fatalf("Run() = %v, want ErrMesh wrapping ErrFile", err)
	}
}

// endingSource is a mesh source whose watch ends, cleanly, as soon as end
// is closed, whether or not the server's context has.
type endingSource struct {
	mesh.Static
	end chan struct{}
}

func (s endingSource) Watch(ctx context.Context, _ func()) (<-chan error, error) {
	c := make(chan error, 1)
	go func() {
		select {
		case <-s.end:
		case <-ctx.Done():
		}
		c <- nil
	}()
	return c, nil
}

// runResult runs srv in the background; the channel receives what Run
// returns.
func runResult(ctx context.Context, srv *xds.Server) <-chan error {
	done := make(chan error, 1)
	go func() { done <- srv.Run(ctx) }()
	return done
}

// waitRun is what Run returned, or fails the test after 10 s.
func waitRun(t *testing.T, done <-chan error) error {
	t.Helper()
	select {
	case err := <-done:
		return err
	case <-time.After(10 * time.Second):
		t.Fatal("Run did not return")
		return nil
	}
}

// TestRunEndsWhateverOrderWatchesEnd: when ctx ends, the watches end too,
// and Run may see a watch's end before ctx's. Either way it returns nil; a
// watch that ends on its own while ctx is live is a failure, not a hang.
func TestRunEndsWhateverOrderWatchesEnd(t *testing.T) {
	newServer := func(src mesh.Source) *xds.Server {
		srv, err := xds.New(xds.Config{Bundle: fakeBundle{}, Mesh: src, Policies: &settable{}, Proxy: testProxy(), Log: testLog()})
		if err != nil {
			t.Fatal(err)
		}
		return srv
	}
	t.Run("a watch ends while the server runs", func(t *testing.T) {
		src := endingSource{Static: mesh.Static{M: &mesh.Mesh{}}, end: make(chan struct{})}
		srv := newServer(src)
		ctx, cancel := context.WithCancel(context.Background())
		defer cancel()
		done := runResult(ctx, srv)
		<-srv.Ready()
		close(src.end)
		if err := waitRun(t, done); err == nil || !strings.Contains(err.Error(), "watch ended") {
			t.Fatalf("Run() = %v, want the watch's end reported", err)
		}
	})
	t.Run("ctx ends", func(t *testing.T) {
		// The watches' ends and ctx's race in Run's select; repeat so that
		// both orders are taken.
		for range 200 {
			srv := newServer(mesh.Static{M: &mesh.Mesh{}})
			ctx, cancel := context.WithCancel(context.Background())
			done := runResult(ctx, srv)
			<-srv.Ready()
			cancel()
			if err := waitRun(t, done); err != nil {
				t.Fatalf("Run() = %v after ctx ended, want nil", err)
			}
		}
	})
}
