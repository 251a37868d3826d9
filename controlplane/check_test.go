package controlplane_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"net/http"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/check"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/xds"
)

// TestCheckAgainstARunningControlPlane runs trustmesh check against serve on
// the example mesh and policies: /readyz answers, and the monitoring port's
// xDS clients endpoint lists an ADS client that was sent its listeners.
// Unacknowledged past --stale-after (on the control plane's clock), it is
// stale; once it acknowledges, it is synced and the check is healthy.
func TestCheckAgainstARunningControlPlane(t *testing.T) {
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
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(conn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	const nodeID = "sidecar~127.0.0.1~echo-0.demo~demo.svc.cluster.local"
	md, _ := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": "echo", "NAMESPACE": "demo"})
	node := &corev3.Node{Id: nodeID, Metadata: md}
	const listeners = "type.googleapis.com/envoy.config.listener.v3.Listener"
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: listeners}); err != nil {
		t.Fatal(err)
	}
	resp, err := stream.Recv()
	if err != nil {
		t.Fatal(err)
	}

	cfg := check.Config{DataDir: admin.DataDir(e.dataDir), Monitoring: e.cp.Addrs().Monitoring.String(),
		Policies: "../examples/policies", Mesh: "../examples/mesh"}
	run := func() *check.Report {
		t.Helper()
		cfg.Now = e.clock.Now()
		rep, err := check.Run(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		return rep
	}
	severities := func(rep *check.Report, code string) []check.Severity {
		var out []check.Severity
		for _, f := range rep.Findings {
			if f.Code == code {
				out = append(out, f.Severity)
			}
		}
		return out
	}

	// Sent, not acknowledged, for longer than --stale-after.
	e.clock.Step(check.DefaultStaleAfter + time.Minute)
	rep := run()
	if got := severities(rep, check.CodeXDSStale); len(got) != 1 || got[0] != check.Warning {
		t.Errorf("an unacknowledged client: %s findings %v, want one warning\n%+v", check.CodeXDSStale, got, rep.Findings)
	}

	// The acknowledgement.
	if err := stream.Send(&discoveryv3.DiscoveryRequest{Node: node, TypeUrl: listeners,
		VersionInfo: resp.GetVersionInfo(), ResponseNonce: resp.GetNonce()}); err != nil {
		t.Fatal(err)
	}
	var clients xds.Clients
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		clients = getClients(t, "http://"+cfg.Monitoring+xds.ClientsPath)
		if len(clients.Clients) == 1 && clients.Clients[0].Synced {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("the client never showed as synced: %+v", clients)
		}
	}
	c := clients.Clients[0]
	if c.NodeID != nodeID || c.SPIFFEID != echoID.String() || len(c.Types) != 1 || c.Types[0].Acked != resp.GetVersionInfo() {
		t.Errorf("client %+v, want %s of %s with listeners acknowledged at %s", c, nodeID, echoID, resp.GetVersionInfo())
	}

	rep = run()
	if w := rep.Worst(); w > check.Info {
		t.Errorf("a healthy control plane checks %s:\n%+v", w, rep.Findings)
	}
	for _, code := range []string{check.CodeReady, check.CodeXDSClients, check.CodePolicies, check.CodeMesh} {
		if got := severities(rep, code); len(got) != 1 || got[0] != check.OK {
			t.Errorf("%s: %v, want ok", code, got)
		}
	}
	for _, f := range rep.Findings {
		if f.Code == check.CodeXDSClients && !strings.Contains(f.Message, "1 xDS clients connected: 1 synced, 0 stale") {
			t.Errorf("%s: %q, want one synced client", f.Code, f.Message)
		}
	}

	// A control plane that is gone does not answer.
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	rep = run()
	if got := severities(rep, check.CodeReady); len(got) != 1 || got[0] != check.Error {
		t.Errorf("a stopped control plane: %s %v, want an error", check.CodeReady, got)
	}
}

func getClients(t *testing.T, url string) xds.Clients {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	var cs xds.Clients
	if err := json.NewDecoder(resp.Body).Decode(&cs); err != nil {
		t.Fatal(err)
	}
	return cs
}
