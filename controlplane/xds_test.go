package controlplane_test

import (
	"context"
	"crypto/tls"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	listenerv3 "github.com/envoyproxy/go-control-plane/envoy/config/listener/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/trustmesh/trustmesh/controlplane"
)

// TestServeServesXDS runs trustmesh serve on the example mesh and policies:
// a proxy with a certificate for its own identity gets its listeners over
// ADS on the CA port; one asking for another workload's node is refused.
func TestServeServesXDS(t *testing.T) {
	e := start(t, func(c *controlplane.Config) {
		c.XDS.MeshDir = "../examples/mesh"
		c.Authz.PolicyDir = "../examples/policies"
		c.Listen.Authz = "off"
	})
	echoID := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo")
	echo := &workload{id: echoID, c: newClient(t)}
	e.obtain(echo.c, e.token(echoID, time.Minute), echoID)
	echo.setCert()
	conn, err := grpc.NewClient(e.cp.Addrs().CA.String(), grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		RootCAs: rootPool(e), ServerName: "localhost", Time: e.clock.Now, Certificates: []tls.Certificate{*echo.cert.Load()}})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ask := func(nodeID, ns, sa string) (*discoveryv3.DiscoveryResponse, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
		if err != nil {
			return nil, err
		}
		md, _ := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": sa, "NAMESPACE": ns})
		if err := stream.Send(&discoveryv3.DiscoveryRequest{
			Node: &corev3.Node{Id: nodeID, Metadata: md}, TypeUrl: "type.googleapis.com/envoy.config.listener.v3.Listener",
		}); err != nil {
			return nil, err
		}
		return stream.Recv()
	}
	resp, err := ask("sidecar~127.0.0.1~echo-0.demo~demo.svc.cluster.local", "demo", "echo")
	if err != nil {
		t.Fatalf("the echo proxy was refused its own config: %v", err)
	}
	if len(resp.Resources) == 0 {
		t.Fatal("no listeners for the echo proxy")
	}
	for _, r := range resp.Resources {
		var l listenerv3.Listener
		if err := r.UnmarshalTo(&l); err != nil {
			t.Fatal(err)
		}
		if err := l.ValidateAll(); err != nil {
			t.Fatalf("listener %s: %v", l.Name, err)
		}
	}
	if m := e.metrics(); !strings.Contains(m, `trustmesh_xds_pushes_total{type="type.googleapis.com/envoy.config.listener.v3.Listener"} 1`) {
		t.Error("metrics lack the listener push")
	}
	_, err = ask("sidecar~127.0.0.1~client-0.demo~demo.svc.cluster.local", "demo", "client")
	if status.Code(err) != codes.PermissionDenied {
		t.Fatalf("echo's certificate asking for client's node: %v, want PermissionDenied", err)
	}
}
