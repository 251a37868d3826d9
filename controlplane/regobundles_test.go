package controlplane_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/internal/freeport"
)

// serve --policies examples/policies loads the Rego bundle that the
// directory's bundles.txt names, and its CUSTOM policy decides with it:
// the example request is allowed for a user the bundle knows and denied
// for one it does not, which no AuthorizationPolicy alone tells apart.
func TestServeDecidesWithTheExampleBundle(t *testing.T) {
	addr := freeport.Addr(t)
	var decisions bytes.Buffer // read once the control plane stopped
	e := start(t, func(c *controlplane.Config) {
		c.Authz.PolicyDir = "../examples/policies"
		c.Listen.Authz = addr
		c.Authz.DecisionLog = &decisions
	})
	envoyID := spiffeid.RequireFromString("spiffe://cluster.local/ns/bookinfo/sa/productpage")
	envoy := newClient(t)
	e.obtain(envoy, e.token(envoyID, time.Minute), envoyID)
	w := &workload{id: envoyID, c: envoy}
	w.setCert()
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		ServerName: "localhost", Time: e.clock.Now, RootCAs: rootPool(e), Certificates: []tls.Certificate{*w.cert.Load()}})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	raw, err := os.ReadFile("../examples/policies/requests/productpage-get.json")
	if err != nil {
		t.Fatal(err)
	}
	for user, want := range map[string]codes.Code{"alice": codes.OK, "mallory": codes.PermissionDenied} {
		var req authv3.CheckRequest
		if err := protojson.Unmarshal(raw, &req); err != nil {
			t.Fatal(err)
		}
		req.Attributes.Request.Http.Headers["x-user"] = user
		ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
		resp, err := authv3.NewAuthorizationClient(conn).Check(ctx, &req, grpc.WaitForReady(true))
		cancel()
		if err != nil {
			t.Fatal(err)
		}
		if got := codes.Code(resp.GetStatus().GetCode()); got != want {
			t.Errorf("x-user %s: %v, want %v", user, got, want)
		}
	}
	if err := e.stop(); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(decisions.String(), "CUSTOM provider denied") {
		t.Errorf("no decision of the Rego provider in the log:\n%s", decisions.String())
	}
}

// On Kubernetes every Rego bundle must be signed, the ones a policy
// directory names too; with a verification key, an unsigned bundle is
// refused anywhere and a bundle signed with the key is accepted. The
// check is part of Validate, so `serve --validate` and a start agree.
func TestRegoBundlesMustBeSignedOnKubernetes(t *testing.T) {
	dir := t.TempDir()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	privFile, pubFile := filepath.Join(dir, "signing.pem"), filepath.Join(dir, "verification.pem")
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, privFile, pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
	writeFile(t, pubFile, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	signed := filepath.Join(dir, "envoy-signed.tar.gz")
	signBundle(t, "../policies/envoy", privFile, signed)

	// A policy directory like examples/policies whose bundles.txt names
	// the signed bundle.
	pdir := filepath.Join(dir, "policies")
	policy, err := os.ReadFile("../examples/policies/00-mesh-ext-authz.yaml")
	if err != nil {
		t.Fatal(err)
	}
	writeFile(t, filepath.Join(pdir, "ext.yaml"), policy)
	writeFile(t, filepath.Join(pdir, source.BundlesFile), []byte(signed+"\n"))

	on := controlplane.KubernetesConfig{Mode: controlplane.KubernetesOn}
	off := controlplane.KubernetesConfig{Mode: controlplane.KubernetesOff}
	for _, tc := range []struct {
		name    string
		kube    controlplane.KubernetesConfig
		authz   controlplane.AuthzConfig
		refused bool
	}{
		{"unsigned, on Kubernetes", on, controlplane.AuthzConfig{PolicyDir: "../examples/policies"}, true},
		{"unsigned, on Kubernetes, by --bundle", on, controlplane.AuthzConfig{Bundles: source.Bundles{Paths: []string{"../policies/envoy"}}}, true},
		{"unsigned, with a key", off, controlplane.AuthzConfig{PolicyDir: "../examples/policies", Bundles: source.Bundles{VerificationKeyFile: pubFile}}, true},
		{"signed, on Kubernetes, no key", on, controlplane.AuthzConfig{PolicyDir: pdir}, true},
		{"signed, on Kubernetes, with the key", on, controlplane.AuthzConfig{PolicyDir: pdir, Bundles: source.Bundles{VerificationKeyFile: pubFile}}, false},
		{"unsigned, off Kubernetes", off, controlplane.AuthzConfig{PolicyDir: "../examples/policies"}, false},
		{"--bundle without --policies, off Kubernetes", off, controlplane.AuthzConfig{Bundles: source.Bundles{Paths: []string{"../policies/envoy"}}}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := controlplane.Config{Kubernetes: tc.kube, Authz: tc.authz}.Validate()
			if (err != nil) != tc.refused {
				t.Fatalf("Validate = %v, want refused %v", err, tc.refused)
			}
			if err != nil && !slicesContain(groups(err), "Authz") {
				t.Fatalf("Validate = %v, want an Authz error", err)
			}
			if tc.name == "unsigned, on Kubernetes" && !errors.Is(err, source.ErrUnsigned) {
				t.Fatalf("Validate = %v, want ErrUnsigned", err)
			}
		})
	}
}

func slicesContain(s []string, v string) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// signBundle writes the bundle directory dir as a .tar.gz signed as `opa
// build --signing-key` signs.
func signBundle(t *testing.T, dir, keyFile, out string) {
	t.Helper()
	b, err := bundle.NewCustomReader(bundle.NewDirectoryLoader(dir)).Read()
	if err != nil {
		t.Fatal(err)
	}
	if err := b.GenerateSignature(bundle.NewSigningConfig(keyFile, "RS256", ""), "default", false); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := bundle.NewWriter(&buf).Write(b); err != nil {
		t.Fatal(err)
	}
	writeFile(t, out, buf.Bytes())
}
