package source

import (
	"errors"
	"fmt"
	"os"
	"strings"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"github.com/open-policy-agent/opa/v1/keys"
)

// ErrUnsigned marks a bundle refused because signatures are required and no
// verification key is configured.
var ErrUnsigned = errors.New("source: bundles must be signed")

// DefaultKeyID is the verification key's ID when none is given, as in OPA.
const DefaultKeyID = "default"

// BundleConfig says how to load one Rego bundle.
type BundleConfig struct {
	// Path is a bundle directory or an OPA bundle .tar.gz.
	Path string
	// RegoV0 parses the bundle's modules in OPA's v0 syntax unless its
	// manifest says otherwise (a manifest's rego_version always wins, as in
	// OPA).
	RegoV0 bool
	// VerificationKey is the PEM public key (or HMAC secret) that signs the
	// bundle; when set, the bundle's .signatures.json must verify.
	VerificationKey string
	// KeyAlgorithm is the signing algorithm; empty means RS256.
	KeyAlgorithm string
	// KeyID names the verification key, as OPA's --verification-key-id:
	// empty means "default". Like OPA, the configured ID wins over the
	// signature's own kid.
	KeyID string
	// Scope, when set, must equal the scope claim of the signature, as
	// OPA's --scope.
	Scope string
	// RequireSignature refuses a bundle when no VerificationKey is set, as
	// trustmesh requires on Kubernetes.
	RequireSignature bool
}

// Validate checks the configuration without reading the bundle.
func (c BundleConfig) Validate() error {
	var errs []error
	if c.Path == "" {
		errs = append(errs, errors.New("source: bundle path must be set"))
	}
	if c.RequireSignature && c.VerificationKey == "" {
		errs = append(errs, fmt.Errorf("%w: %s: no verification key configured: sign it (opa build --signing-key) and give --bundle-verification-key", ErrUnsigned, c.Path))
	}
	return errors.Join(errs...)
}

// LoadBundle reads, verifies and parses one bundle. Errors name the path.
func LoadBundle(c BundleConfig) (*bundle.Bundle, error) {
	if err := c.Validate(); err != nil {
		return nil, err
	}
	fi, err := os.Stat(c.Path)
	if err != nil {
		return nil, fmt.Errorf("source: bundle %s: %w", c.Path, err)
	}
	var r *bundle.Reader
	if fi.IsDir() {
		r = bundle.NewCustomReader(bundle.NewDirectoryLoader(c.Path))
	} else {
		if !strings.HasSuffix(c.Path, ".tar.gz") && !strings.HasSuffix(c.Path, ".tgz") {
			return nil, fmt.Errorf("source: bundle %s: want a directory or a .tar.gz", c.Path)
		}
		f, err := os.Open(c.Path)
		if err != nil {
			return nil, fmt.Errorf("source: bundle %s: %w", c.Path, err)
		}
		defer f.Close()
		r = bundle.NewCustomReader(bundle.NewTarballLoaderWithBaseURL(f, c.Path))
	}
	v := ast.RegoV1
	if c.RegoV0 {
		v = ast.RegoV0
	}
	r = r.WithRegoVersion(v).WithBundleName(c.Path)
	if c.VerificationKey != "" {
		alg := c.KeyAlgorithm
		if alg == "" {
			alg = "RS256"
		}
		id := c.KeyID
		if id == "" {
			id = DefaultKeyID
		}
		// The key is PEM text (or an HMAC secret), never a path: OPA's
		// NewKeyConfig would stat it as a file name. The configuration is
		// OPA's own for `opa run --verification-key`: one key under its ID,
		// and the scope the signature must claim.
		kc := &keys.Config{Key: c.VerificationKey, Algorithm: alg, Scope: c.Scope}
		r = r.WithBundleVerificationConfig(bundle.NewVerificationConfig(map[string]*bundle.KeyConfig{id: kc}, id, c.Scope, nil))
	} else {
		r = r.WithSkipBundleVerification(true)
	}
	b, err := r.Read()
	if err != nil {
		return nil, fmt.Errorf("source: bundle %s: %w", c.Path, err)
	}
	return &b, nil
}
