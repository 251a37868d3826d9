package controlplane_test

import (
	"context"
	"errors"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"github.com/trustmesh/trustmesh/api/identity"
	"github.com/trustmesh/trustmesh/controlplane"
)

// TestDumpXDS: xds dump names the control plane's identity as the
// ext_authz peer unless told otherwise, and reports a flawed request as a
// ConfigError (which the CLI turns into a usage error).
func TestDumpXDS(t *testing.T) {
	node := "sidecar~127.0.0.1~echo-0.demo~demo.svc.cluster.local"
	for _, tc := range []struct {
		name, authzID, want string
	}{
		{"default identity", "", identity.ID("cluster.local", "")},
		{"given identity", "spiffe://cluster.local/ns/auth/sa/authz", "spiffe://cluster.local/ns/auth/sa/authz"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, err := controlplane.DumpXDS(controlplane.DumpConfig{
				MeshDir: "../examples/mesh", PolicyDir: "../examples/mesh/policies", TrustDomain: "cluster.local",
				AuthzID: tc.authzID, NodeID: node,
			})
			if err != nil {
				t.Fatal(err)
			}
			if !strings.Contains(string(out), `"`+tc.want+`"`) {
				t.Errorf("the dump does not require %s of the ext_authz service", tc.want)
			}
		})
	}
	_, err := controlplane.DumpXDS(controlplane.DumpConfig{MeshDir: "../examples/mesh", TrustDomain: "Not A Domain", NodeID: node})
	var ce *controlplane.ConfigError
	if !errors.As(err, &ce) {
		t.Errorf("DumpXDS with a bad trust domain = %v, want a ConfigError", err)
	}
}

// TestRunAuthz runs the ext_authz service alone on a policy directory and
// asks it for a decision.
func TestRunAuthz(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "authz.sock")
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() {
		done <- controlplane.RunAuthz(ctx, controlplane.StandaloneAuthzConfig{
			Address: "unix://" + sock, PolicyDir: "../examples/mesh/policies", RootNamespace: "istio-system",
		})
	}()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("RunAuthz = %v", err)
		}
	}()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, ccancel := context.WithTimeout(ctx, 30*time.Second)
	defer ccancel()
	resp, err := authv3.NewAuthorizationClient(conn).Check(cctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/", Host: "web"}},
	}}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatal(err)
	}
	if resp.GetStatus() == nil {
		t.Fatal("no decision")
	}
}
