package source_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	testclock "k8s.io/utils/clock/testing"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
)

func denyPath(p string) string {
	return `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["` + p + `"]}}]
`
}

const brokenPolicy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["/secret"]}}]
    when: [{key: "request.auth.claims[iss]", values: ["x"]}]
`

func req(path string) *authv3.CheckRequest {
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/bar/sa/c", Address: &corev3.Address{
			Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{Address: "10.0.0.1"}}}},
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/foo/sa/web"},
		Request:     &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Host: "web", Path: path}},
	}}
}

func allowed(t *testing.T, e *engine.Engine, path string) bool {
	t.Helper()
	d, err := e.Check(context.Background(), req(path))
	if err != nil {
		t.Fatalf("Check(%s): %v", path, err)
	}
	return d.Allowed
}

func write(t *testing.T, path, content string) {
	t.Helper()
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestPolicyReload(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.yaml")
	write(t, file, denyPath("/admin"))
	e := engine.New()
	l, err := source.New(source.Config{Engine: e, Policies: &source.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if allowed(t, e, "/admin") || !allowed(t, e, "/secret") {
		t.Fatal("first set not in force")
	}

	write(t, file, brokenPolicy)
	err = l.Load(ctx)
	var fe *policy.FieldError
	if !errors.Is(err, source.ErrRefused) || !errors.As(err, &fe) || !strings.Contains(fe.Origin, file) {
		t.Fatalf("broken policy: %v; want ErrRefused naming %s", err, file)
	}
	if allowed(t, e, "/admin") || !allowed(t, e, "/secret") {
		t.Fatal("a refused update changed decisions")
	}

	write(t, file, denyPath("/secret"))
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if !allowed(t, e, "/admin") || allowed(t, e, "/secret") {
		t.Fatal("fixed update not in force")
	}
}

const customPolicy = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: istio-system}
spec:
  action: CUSTOM
  provider: {name: "rego:app/allow"}
  rules: [{}]
`

func bundleTarball(t *testing.T, path, rego string, sign *rsa.PrivateKey) {
	t.Helper()
	b := bundle.Bundle{
		Manifest: bundle.Manifest{Roots: &[]string{"app"}},
		Data:     map[string]any{},
		Modules:  []bundle.ModuleFile{{URL: "/app/app.rego", Path: "/app/app.rego", Raw: []byte(rego)}},
	}
	b.Manifest.Init()
	if m, err := ast.ParseModule("/app/app.rego", rego); err == nil {
		b.Modules[0].Parsed = m
	}
	if sign != nil {
		der := x509.MarshalPKCS1PrivateKey(sign)
		keyFile := filepath.Join(t.TempDir(), "key.pem")
		write(t, keyFile, string(pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: der})))
		if err := b.GenerateSignature(bundle.NewSigningConfig(keyFile, "RS256", ""), "trustmesh", false); err != nil {
			t.Fatal(err)
		}
	}
	var buf bytes.Buffer
	if err := bundle.NewWriter(&buf).DisableFormat(true).Write(b); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, buf.Bytes(), 0o644); err != nil {
		t.Fatal(err)
	}
}

const (
	allowAdmin = "package app\n\nimport rego.v1\n\ndefault allow := false\n\nallow if input.parsed_path[0] == \"admin\"\n"
	allowUsers = "package app\n\nimport rego.v1\n\ndefault allow := false\n\nallow if input.parsed_path[0] == \"users\"\n"
	brokenRego = "package app\n\nallow if {{{\n"
)

func TestBundleReload(t *testing.T) {
	dir := t.TempDir()
	pdir := filepath.Join(dir, "policies")
	write(t, filepath.Join(pdir, "ext.yaml"), customPolicy)
	tgz := filepath.Join(dir, "bundle.tar.gz")
	bundleTarball(t, tgz, allowAdmin, nil)
	e := engine.New()
	l, err := source.New(source.Config{Engine: e, Policies: &source.Dir{Path: pdir}, Bundles: []source.BundleConfig{{Path: tgz}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if !allowed(t, e, "/admin") || allowed(t, e, "/users") {
		t.Fatal("first bundle not in force")
	}
	if err := os.WriteFile(tgz, []byte("not a tarball"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := l.Load(ctx); !errors.Is(err, source.ErrRefused) || !strings.Contains(err.Error(), tgz) {
		t.Fatalf("broken bundle: %v; want ErrRefused naming %s", err, tgz)
	}
	if !allowed(t, e, "/admin") || allowed(t, e, "/users") {
		t.Fatal("a refused bundle changed decisions")
	}
	bundleTarball(t, tgz, allowUsers, nil)
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	if allowed(t, e, "/admin") || !allowed(t, e, "/users") {
		t.Fatal("fixed bundle not in force")
	}
}

func TestBundleDirectoryReloadRefusesBadRego(t *testing.T) {
	dir := t.TempDir()
	pdir, bdir := filepath.Join(dir, "policies"), filepath.Join(dir, "bundle")
	write(t, filepath.Join(pdir, "ext.yaml"), customPolicy)
	write(t, filepath.Join(bdir, "app.rego"), allowAdmin)
	e := engine.New()
	l, err := source.New(source.Config{Engine: e, Policies: &source.Dir{Path: pdir}, Bundles: []source.BundleConfig{{Path: bdir}}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(bdir, "app.rego"), brokenRego)
	if err := l.Load(ctx); !errors.Is(err, source.ErrRefused) || !strings.Contains(err.Error(), "app.rego") {
		t.Fatalf("broken Rego: %v; want ErrRefused naming app.rego", err)
	}
	if !allowed(t, e, "/admin") {
		t.Fatal("a refused bundle changed decisions")
	}
}

func TestSignedBundles(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	other, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub := func(k *rsa.PrivateKey) string {
		der, _ := x509.MarshalPKIXPublicKey(&k.PublicKey)
		return string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}))
	}
	dir := t.TempDir()
	signed, unsigned := filepath.Join(dir, "signed.tar.gz"), filepath.Join(dir, "unsigned.tar.gz")
	bundleTarball(t, signed, allowAdmin, key)
	bundleTarball(t, unsigned, allowAdmin, nil)
	tests := []struct {
		name string
		cfg  source.BundleConfig
		ok   bool
	}{
		{"signed with the key", source.BundleConfig{Path: signed, VerificationKey: pub(key), RequireSignature: true}, true},
		{"signed with another key", source.BundleConfig{Path: signed, VerificationKey: pub(other)}, false},
		{"unsigned with a key", source.BundleConfig{Path: unsigned, VerificationKey: pub(key)}, false},
		{"unsigned, signatures required", source.BundleConfig{Path: unsigned, RequireSignature: true}, false},
		{"unsigned, not required", source.BundleConfig{Path: unsigned}, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := source.LoadBundle(tt.cfg)
			if (err == nil) != tt.ok {
				t.Fatalf("LoadBundle = %v, want ok %v", err, tt.ok)
			}
		})
	}
}

// writeAtomic replaces a file the way Kubernetes volume updates do.
func writeAtomic(t *testing.T, path, content string) {
	t.Helper()
	tmp := filepath.Join(filepath.Dir(path), ".tmp-"+filepath.Base(path))
	write(t, tmp, content)
	if err := os.Rename(tmp, path); err != nil {
		t.Fatal(err)
	}
}

// TestRunWatches drives Run through real file-system events: a broken file
// is refused, a fixed one takes effect. The settle period runs on a fake
// clock that the test steps once Run is waiting on it.
func TestRunWatches(t *testing.T) {
	dir := t.TempDir()
	file := filepath.Join(dir, "p.yaml")
	write(t, file, denyPath("/admin"))
	loads := make(chan error, 16)
	clk := testclock.NewFakeClock(time.Unix(0, 0))
	e := engine.New()
	l, err := source.New(source.Config{
		Engine: e, Policies: &source.Dir{Path: dir}, Clock: clk, Settle: time.Second,
		OnLoad: func(err error) { loads <- err },
	})
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- l.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
	}()
	if err := <-loads; err != nil {
		t.Fatal(err)
	}
	// next steps the fake clock whenever Run waits on its settle timer and
	// returns the result of the reload that follows.
	next := func() error {
		t.Helper()
		guard := time.NewTimer(10 * time.Second) // a failure guard, not a wait
		defer guard.Stop()
		for {
			if clk.HasWaiters() {
				clk.Step(time.Second)
			}
			select {
			case err := <-loads:
				return err
			case <-guard.C:
				t.Fatal("no reload")
			default:
				runtime.Gosched()
			}
		}
	}
	writeAtomic(t, file, brokenPolicy)
	// Loads that see only the temporary file still succeed with the old
	// content; the update is the first refusal.
	err = next()
	for err == nil {
		err = next()
	}
	if !errors.Is(err, source.ErrRefused) {
		t.Fatalf("broken update: %v, want ErrRefused", err)
	}
	if allowed(t, e, "/admin") {
		t.Fatal("a refused update changed decisions")
	}
	writeAtomic(t, file, denyPath("/secret"))
	for next() != nil { // loads before the rename still see the broken file
	}
	if !allowed(t, e, "/admin") || allowed(t, e, "/secret") {
		t.Fatal("fixed update not in force")
	}
}
