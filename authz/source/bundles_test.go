package source_test

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
)

// A policy directory names its bundles in bundles.txt, relative to itself;
// they load as --bundle would, once each, and the Loader serves them.
func TestPolicyDirectoryNamesItsBundles(t *testing.T) {
	dir := t.TempDir()
	pdir := filepath.Join(dir, "policies")
	write(t, filepath.Join(pdir, "ext.yaml"), customPolicy)
	write(t, filepath.Join(dir, "rego", "app.rego"), allowAdmin)
	write(t, filepath.Join(pdir, source.BundlesFile), "# the CUSTOM policy's bundle\n\n../rego\n")

	bs, err := source.Bundles{Paths: []string{filepath.Join(dir, "rego")}}.Configs(pdir)
	if err != nil {
		t.Fatal(err)
	}
	if len(bs) != 1 || bs[0].Path != filepath.Join(dir, "rego") {
		t.Fatalf("Configs = %+v, want the one bundle once, though --bundle and %s both name it", bs, source.BundlesFile)
	}
	bs, err = source.Bundles{}.Configs(pdir)
	if err != nil {
		t.Fatal(err)
	}
	e := engine.New()
	l, err := source.New(source.Config{Engine: e, Policies: &source.Dir{Path: pdir}, Bundles: bs})
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Load(context.Background()); err != nil {
		t.Fatal(err)
	}
	if !allowed(t, e, "/admin") || allowed(t, e, "/users") {
		t.Fatal("the bundle bundles.txt names does not decide")
	}

	write(t, filepath.Join(pdir, source.BundlesFile), "../rego\n../missing\n")
	_, err = source.Bundles{}.Configs(pdir)
	if !errors.Is(err, os.ErrNotExist) || !strings.Contains(err.Error(), source.BundlesFile+":2") {
		t.Fatalf("a missing bundle: %v; want not-exist naming %s:2", err, source.BundlesFile)
	}
}

// A CUSTOM provider whose bundle is not loaded is refused with what to do;
// a first load that fails refuses the start, and only a later one keeps a
// last good set.
func TestRefusalsSayWhatFollows(t *testing.T) {
	dir := t.TempDir()
	write(t, filepath.Join(dir, "ext.yaml"), customPolicy)
	e := engine.New()
	l, err := source.New(source.Config{Engine: e, Policies: &source.Dir{Path: dir}})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	err = l.Load(ctx)
	var mb *engine.MissingBundleError
	if !errors.Is(err, source.ErrStartRefused) || !errors.Is(err, source.ErrRefused) || !errors.As(err, &mb) || !errors.Is(err, engine.ErrUnknownProvider) {
		t.Fatalf("first load: %v; want ErrStartRefused and a MissingBundleError", err)
	}
	msg := err.Error()
	for _, want := range []string{"no policy set has loaded", "data.app.allow", "--bundle", filepath.Join(dir, source.BundlesFile)} {
		if !strings.Contains(msg, want) {
			t.Errorf("first load: %q lacks %q", msg, want)
		}
	}
	if strings.Contains(msg, "last good") {
		t.Errorf("first load: %q speaks of a last good set; there is none", msg)
	}

	write(t, filepath.Join(dir, "ext.yaml"), denyPath("/admin"))
	if err := l.Load(ctx); err != nil {
		t.Fatal(err)
	}
	write(t, filepath.Join(dir, "ext.yaml"), customPolicy)
	err = l.Load(ctx)
	if !errors.Is(err, source.ErrRefused) || errors.Is(err, source.ErrStartRefused) || !strings.Contains(err.Error(), "last good policy set is kept") {
		t.Fatalf("later load: %v; want a refusal that keeps the last good set", err)
	}
}

// With a verification key every bundle must be signed by it, whether
// --bundle or bundles.txt names it; signatures required and no key is a
// configuration error. The key ID and scope work as OPA's.
func TestBundlesVerification(t *testing.T) {
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	keyFile := filepath.Join(dir, "key.pem")
	write(t, keyFile, string(pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})))
	signed, unsigned := filepath.Join(dir, "signed.tar.gz"), filepath.Join(dir, "unsigned.tar.gz")
	bundleTarball(t, signed, allowAdmin, key)
	bundleTarball(t, unsigned, allowAdmin, nil)
	pdir := filepath.Join(dir, "policies")
	write(t, filepath.Join(pdir, "ext.yaml"), customPolicy)

	load := func(b source.Bundles, listed string) error {
		write(t, filepath.Join(pdir, source.BundlesFile), listed+"\n")
		bs, err := b.Configs(pdir)
		if err != nil {
			return err
		}
		for _, bc := range bs {
			if _, err := source.LoadBundle(bc); err != nil {
				return err
			}
		}
		return nil
	}
	tests := []struct {
		name   string
		b      source.Bundles
		listed string
		ok     bool
	}{
		{"signed, listed", source.Bundles{VerificationKeyFile: keyFile}, signed, true},
		{"unsigned, listed, with a key", source.Bundles{VerificationKeyFile: keyFile}, unsigned, false},
		{"unsigned by --bundle, with a key", source.Bundles{Paths: []string{unsigned}, VerificationKeyFile: keyFile}, signed, false},
		{"unsigned, signatures required", source.Bundles{RequireSignature: true}, unsigned, false},
		{"signed, another key ID", source.Bundles{VerificationKeyFile: keyFile, KeyID: "other"}, signed, true},
		{"signed, wrong scope", source.Bundles{VerificationKeyFile: keyFile, Scope: "write"}, signed, false},
		{"a scope without a key", source.Bundles{Scope: "write"}, unsigned, false},
		{"a missing key file", source.Bundles{VerificationKeyFile: filepath.Join(dir, "nope.pem")}, signed, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := load(tt.b, tt.listed)
			if (err == nil) != tt.ok {
				t.Fatalf("load = %v, want ok %v", err, tt.ok)
			}
		})
	}
	if err := load(source.Bundles{RequireSignature: true}, unsigned); !errors.Is(err, source.ErrUnsigned) {
		t.Fatalf("unsigned with signatures required: %v, want ErrUnsigned", err)
	}
	if err := load(source.Bundles{VerificationKeyFile: filepath.Join(dir, "nope.pem")}, signed); err == nil || !strings.Contains(err.Error(), "--bundle-verification-key") {
		t.Fatalf("a missing key file: %v, want an error naming --bundle-verification-key", err)
	}
}
