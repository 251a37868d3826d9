package adversary

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
)

// TestCustomProviderSeesTheInputWhateverTheBody attacks the CUSTOM Rego
// provider's reduced input through the running binary: a policy that reads
// no body must still see the caller's principal when the body is a JSON
// value followed by null, which OPA's body parser accepts and json.Valid
// does not. Before the fix the provider ran with no input at all, and a
// deny-list policy ("allow if not deny") let the attacker through.
func TestCustomProviderSeesTheInputWhateverTheBody(t *testing.T) {
	bdir := t.TempDir()
	if err := os.WriteFile(filepath.Join(bdir, "authz.rego"), []byte(`package envoy.authz
default allow := false
deny if input.attributes.source.principal == "`+attackerID+`"
allow if not deny
`), 0o644); err != nil {
		t.Fatal(err)
	}
	s, err := startServer(serveConfig{policies: map[string][]byte{"custom.yaml": []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: istio-system}
spec:
  action: CUSTOM
  provider: {name: "rego:envoy/authz/allow"}
  rules: [{}]
`)}, args: []string{"--bundle", bdir}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(s.stop)
	s.decide(t, check{dst: "shop", src: webID}) // the authz port serves
	client := s.authzClient(t)
	for _, body := range []string{`{"order":1}`, `{"order":1} null`, `{}null`, "[1]\nnull", `null null`} {
		req := check{dst: "shop", src: attackerID, path: "/orders"}.request()
		h := req.Attributes.Request.Http
		h.Method, h.Body = "POST", body
		h.Headers[":method"], h.Headers["content-type"] = "POST", "application/json"
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		resp, err := client.Check(ctx, req, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if got := codes.Code(resp.GetStatus().GetCode()); got != codes.PermissionDenied {
			t.Errorf("attacker, body %q: %v, want %v", body, got, codes.PermissionDenied)
		}
	}
}
