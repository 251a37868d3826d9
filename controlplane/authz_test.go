package controlplane_test

import (
	"bytes"
	"context"
	"crypto/tls"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/status"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/freeport"
)

const denyAdmin = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-admin
  namespace: shop
spec:
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/admin*"]
`

// TestServeEnforcesAuthorizationPolicies runs the authorization service as
// part of the control plane and calls it as an Envoy would: over mTLS with a
// certificate from the CA. A client without one is turned away.
func TestServeEnforcesAuthorizationPolicies(t *testing.T) {
	policies := t.TempDir()
	if err := os.WriteFile(filepath.Join(policies, "deny-admin.yaml"), []byte(denyAdmin), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := freeport.Addr(t)
	var decisions bytes.Buffer // read once the control plane stopped
	e := start(t, func(c *controlplane.Config) {
		c.Authz.PolicyDir = policies
		c.Listen.Authz = addr
		c.Authz.DecisionLog = &decisions
		c.Authz.LogRedactPaths = []string{`^/admin/(.+)`}
	})
	envoyID := spiffeid.RequireFromString("spiffe://cluster.local/ns/shop/sa/server")
	envoy := newClient(t)
	e.obtain(envoy, e.token(envoyID, time.Minute), envoyID)

	w := &workload{id: envoyID, c: envoy}
	w.setCert()
	dial := func(withCert bool) authv3.AuthorizationClient {
		cfg := &tls.Config{ServerName: "localhost", Time: e.clock.Now}
		cfg.RootCAs = rootPool(e)
		if withCert {
			cfg.Certificates = []tls.Certificate{*w.cert.Load()}
		}
		conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(cfg)))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { conn.Close() })
		return authv3.NewAuthorizationClient(conn)
	}
	check := func(c authv3.AuthorizationClient, path string) (*authv3.CheckResponse, error) {
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		defer cancel()
		return c.Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
			Source:      &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/shop/sa/client"},
			Destination: &authv3.AttributeContext_Peer{Principal: envoyID.String(), Address: &corev3.Address{}},
			Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
				Method: "GET", Path: path, Host: "server.shop.svc"}},
		}}, grpc.WaitForReady(true))
	}
	client := dial(true)
	resp, err := check(client, "/catalog")
	if err != nil {
		t.Fatal(err)
	}
	if codes.Code(resp.GetStatus().GetCode()) != codes.OK {
		t.Fatalf("GET /catalog: status %v, want OK", resp.GetStatus())
	}
	resp, err = check(client, "/admin/users")
	if err != nil {
		t.Fatal(err)
	}
	if codes.Code(resp.GetStatus().GetCode()) != codes.PermissionDenied {
		t.Fatalf("GET /admin/users: status %v, want PermissionDenied", resp.GetStatus())
	}
	m := e.metrics()
	for _, want := range []string{`trustmesh_authz_decisions_total{result="allow"} 1`, `trustmesh_authz_decisions_total{result="deny"} 1`,
		"trustmesh_authz_check_duration_seconds_count 2"} {
		if !strings.Contains(m, want) {
			t.Errorf("metrics lack %s", want)
		}
	}
	// A caller with no certificate never reaches the engine.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_, err = dial(false).Check(ctx, &authv3.CheckRequest{})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("a call with no client certificate: %v, want the handshake refused", err)
	}
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(decisions.String(), `"path":"/admin/REDACTED"`) || strings.Contains(decisions.String(), "users") {
		t.Errorf("the decision log did not redact /admin/users:\n%s", decisions.String())
	}
}

func TestInvalidPathRedactionPatternIsAConfigError(t *testing.T) {
	err := controlplane.Config{Authz: controlplane.AuthzConfig{LogRedactPaths: []string{"/ok/(.*)", "/bad/("}}}.Validate()
	if !errors.Is(err, decisionlog.ErrBadPattern) {
		t.Fatalf("Validate = %v, want ErrBadPattern", err)
	}
}
