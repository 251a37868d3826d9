package controlplane_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/types/known/structpb"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/freeport"
	"github.com/trustmesh/trustmesh/xds"
)

// lockedBuffer is a writer the control plane and the test share.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// lines are the JSON lines written so far.
func (b *lockedBuffer) lines(t *testing.T) []map[string]any {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, l := range strings.Split(strings.TrimSpace(b.buf.String()), "\n") {
		if l == "" {
			continue
		}
		m := map[string]any{}
		if err := json.Unmarshal([]byte(l), &m); err != nil {
			t.Fatalf("%q: %v", l, err)
		}
		out = append(out, m)
	}
	return out
}

func echoDeny(paths ...string) string {
	return fmt.Sprintf(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: demo}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["%s"]}}]}]
`, strings.Join(paths, `", "`))
}

// TestOnePolicyFeed runs serve on a policy directory with ext_authz and
// xDS both on, edits the policy file, and checks that ext_authz's decision
// and the RBAC pushed over xDS come from one snapshot: the same policy
// version, published once by one feed (one watch, one parse).
func TestOnePolicyFeed(t *testing.T) {
	policies := t.TempDir()
	file := filepath.Join(policies, "deny.yaml")
	write := func(s string) {
		t.Helper()
		if err := os.WriteFile(file+".tmp", []byte(s), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(file+".tmp", file); err != nil {
			t.Fatal(err)
		}
	}
	write(echoDeny("/admin"))
	authzAddr := freeport.Addr(t)
	var decisions, logs lockedBuffer
	e := start(t, func(c *controlplane.Config) {
		c.XDS.MeshDir = "../examples/mesh"
		c.Authz.PolicyDir = policies
		c.Listen.Authz = authzAddr
		c.Authz.DecisionLog = &decisions
		c.Log = slog.New(slog.NewJSONHandler(&logs, nil))
	})
	echoID := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo")
	echo := &workload{id: echoID, c: newClient(t)}
	e.obtain(echo.c, e.token(echoID, time.Minute), echoID)
	echo.setCert()
	creds := credentials.NewTLS(&tls.Config{RootCAs: rootPool(e), ServerName: "localhost", Time: e.clock.Now,
		Certificates: []tls.Certificate{*echo.cert.Load()}})

	// The echo sidecar's listeners over ADS, acknowledged so that changes
	// are pushed.
	xconn, err := grpc.NewClient(e.cp.Addrs().CA.String(), grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer xconn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	stream, err := discoveryv3.NewAggregatedDiscoveryServiceClient(xconn).StreamAggregatedResources(ctx)
	if err != nil {
		t.Fatal(err)
	}
	// A proxyless grpc-go server: its RBAC comes over xDS.
	md, _ := structpb.NewStruct(map[string]any{"SERVICE_ACCOUNT": "echo", "NAMESPACE": "demo", "GENERATOR": "grpc"})
	const listenerType = "type.googleapis.com/envoy.config.listener.v3.Listener"
	if err := stream.Send(&discoveryv3.DiscoveryRequest{
		Node: &corev3.Node{Id: "sidecar~127.0.0.1~echo-0.demo~demo.svc.cluster.local", Metadata: md}, TypeUrl: listenerType,
	}); err != nil {
		t.Fatal(err)
	}
	pushes := make(chan *discoveryv3.DiscoveryResponse, 8)
	go func() {
		for {
			r, err := stream.Recv()
			if err != nil {
				close(pushes)
				return
			}
			pushes <- r
		}
	}()
	// next returns the next push, stepping the xDS debounce, which runs on
	// the control plane's fake clock, while it waits.
	next := func(what string) string {
		t.Helper()
		deadline := time.After(30 * time.Second)
		for {
			select {
			case r, ok := <-pushes:
				if !ok {
					t.Fatalf("%s: the ADS stream ended", what)
				}
				if err := stream.Send(&discoveryv3.DiscoveryRequest{TypeUrl: listenerType, VersionInfo: r.GetVersionInfo(), ResponseNonce: r.GetNonce()}); err != nil {
					t.Fatal(err)
				}
				var b strings.Builder
				for _, res := range r.GetResources() {
					j, _ := protojson.Marshal(res)
					b.Write(j)
				}
				return b.String()
			case <-deadline:
				t.Fatalf("%s: no push", what)
			case <-time.After(10 * time.Millisecond):
				if e.clock.HasWaiters() {
					e.clock.Step(xds.DefaultDebounce)
				}
			}
		}
	}
	if rbac := next("first push"); !strings.Contains(rbac, "/admin") || strings.Contains(rbac, "/secret") {
		t.Fatalf("the first RBAC does not deny /admin alone: %s", rbac)
	}

	// ext_authz, called as echo's Envoy calls it.
	aconn, err := grpc.NewClient(authzAddr, grpc.WithTransportCredentials(creds))
	if err != nil {
		t.Fatal(err)
	}
	defer aconn.Close()
	check := func(path string) codes.Code {
		t.Helper()
		resp, err := authv3.NewAuthorizationClient(aconn).Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Source:      &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/demo/sa/client"},
			Destination: &authv3.AttributeContext_Peer{Principal: echoID.String(), Address: &corev3.Address{}},
			Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
				Method: "GET", Path: path, Host: "echo.demo.svc"}},
		}}, grpc.WaitForReady(true))
		if err != nil {
			t.Fatal(err)
		}
		return codes.Code(resp.GetStatus().GetCode())
	}
	if check("/secret") != codes.OK {
		t.Fatal("/secret denied before the edit")
	}

	write(echoDeny("/admin", "/secret"))
	if rbac := next("the edit"); !strings.Contains(rbac, "/secret") {
		t.Fatal("the RBAC pushed after the edit does not deny /secret")
	}
	// The engine applies the snapshot on its own, after or before the xDS
	// push: poll until ext_authz denies /secret.
	deadline := time.Now().Add(10 * time.Second)
	for check("/secret") != codes.PermissionDenied {
		if time.Now().After(deadline) {
			t.Fatal("ext_authz still allows /secret after xDS pushed the RBAC that denies it")
		}
		time.Sleep(10 * time.Millisecond)
	}

	// The decision and the push name one snapshot. The decision log is
	// written from a queue and the push is logged after it is handed to
	// the streams, so wait until both logs hold the denial and the push.
	var (
		denied     map[string]any // the last /secret decision that denied
		pushed     []any
		published  int
		digests    = map[any]any{} // policy version -> digest published
		logsCaught = time.Now().Add(10 * time.Second)
	)
	for {
		denied = nil
		for _, d := range decisions.lines(t) {
			if d["path"] == "/secret" && d["allowed"] == false {
				denied = d
			}
		}
		pushed, published = nil, 0
		for _, l := range logs.lines(t) {
			switch l["msg"] {
			case "xds configuration pushed":
				pushed = append(pushed, l["policy_version"])
			case "policy snapshot published":
				published++
				digests[l["policy_version"]] = l["policy_digest"]
			}
		}
		if denied != nil && len(pushed) > 0 && pushed[len(pushed)-1] == float64(2) {
			break
		}
		if time.Now().After(logsCaught) {
			t.Fatalf("the logs lack the denial of /secret (%v) or the push of policy version 2 (pushed %v)", denied, pushed)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if denied["policy_version"] != float64(2) || denied["policy_digest"] != digests[float64(2)] {
		t.Fatalf("ext_authz denied /secret on policy version %v (%v), xDS pushed versions %v; want both on version 2 (%v)",
			denied["policy_version"], denied["policy_digest"], pushed, digests[float64(2)])
	}
	// One feed: one snapshot per version, counted once.
	if published != 2 {
		t.Fatalf("%d policy snapshots published for the first load and one edit, want 2 (one feed)", published)
	}
	m := e.metrics()
	for _, want := range []string{"trustmesh_policy_snapshots_total 2", "trustmesh_policy_version 2"} {
		if !strings.Contains(m, want+"\n") {
			t.Errorf("metrics lack %q", want)
		}
	}
}
