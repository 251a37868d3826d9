package source

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/trustmesh/trustmesh/authz/engine"
)

// BundlesFile is the file in a policy directory that names the Rego
// bundles its CUSTOM policies need: one bundle (a directory or a .tar.gz)
// a line, relative to the policy directory unless absolute; blank lines and
// lines starting with # are ignored. It is read once, at start, and loaded
// exactly as bundles given with --bundle, with the same verification. It
// is not a .yaml file, so the policy parser never reads it.
const BundlesFile = "bundles.txt"

// Bundles are the Rego bundles one process loads and how it verifies them,
// as the --bundle flags of `serve`, `authz` and `policy` give them. Every
// bundle is verified alike.
type Bundles struct {
	// Paths are bundle directories or .tar.gz files (--bundle).
	Paths []string
	// RegoV0 parses modules in OPA's v0 syntax unless a manifest says
	// otherwise (--rego-v0).
	RegoV0 bool
	// VerificationKeyFile holds the PEM public key (or HMAC secret) that
	// signs the bundles (--bundle-verification-key). With it, every bundle
	// must carry a .signatures.json that verifies.
	VerificationKeyFile string
	// KeyID, KeyAlgorithm and Scope are as in BundleConfig
	// (--bundle-verification-key-id, --bundle-key-algorithm,
	// --bundle-verification-scope).
	KeyID, KeyAlgorithm, Scope string
	// RequireSignature refuses unsigned bundles (--require-signed-bundles;
	// always on Kubernetes).
	RequireSignature bool
}

// Configs reads the verification key and returns a BundleConfig for every
// bundle in b.Paths and every bundle that policyDir's BundlesFile names (no
// file, or no policyDir, names none). Errors name the flag or the file and
// line at fault.
func (b Bundles) Configs(policyDir string) ([]BundleConfig, error) {
	var errs []error
	var key string
	if b.VerificationKeyFile != "" {
		k, err := os.ReadFile(b.VerificationKeyFile)
		if err != nil {
			errs = append(errs, fmt.Errorf("--bundle-verification-key: %w", err))
		} else if len(bytes.TrimSpace(k)) == 0 {
			errs = append(errs, fmt.Errorf("--bundle-verification-key: %s is empty", b.VerificationKeyFile))
		}
		key = string(k)
	}
	if b.VerificationKeyFile == "" && (b.KeyID != "" || b.Scope != "") {
		errs = append(errs, errors.New("--bundle-verification-key-id and --bundle-verification-scope need --bundle-verification-key"))
	}
	paths := append([]string(nil), b.Paths...)
	for _, p := range paths {
		if p == "" {
			errs = append(errs, errors.New("--bundle: empty path"))
		}
	}
	if policyDir != "" {
		named, err := (&Dir{Path: policyDir}).Bundles()
		errs = append(errs, err)
		paths = append(paths, named...)
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	// A bundle given twice (by --bundle and by the directory) loads once:
	// loaded twice, its data would conflict with itself.
	seen := map[string]bool{}
	var out []BundleConfig
	for _, p := range paths {
		abs, err := filepath.Abs(p)
		if err != nil {
			abs = p
		}
		if seen[abs] {
			continue
		}
		seen[abs] = true
		out = append(out, BundleConfig{
			Path: p, RegoV0: b.RegoV0, VerificationKey: key, KeyAlgorithm: b.KeyAlgorithm,
			KeyID: b.KeyID, Scope: b.Scope, RequireSignature: b.RequireSignature,
		})
	}
	return out, nil
}

// Bundles returns the bundles the directory's BundlesFile names, resolved
// against the directory; none when it has no such file. A named bundle
// that does not exist is an error naming the file and line.
func (d *Dir) Bundles() ([]string, error) {
	file := filepath.Join(d.Path, BundlesFile)
	data, err := os.ReadFile(file)
	if errors.Is(err, os.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("source: %w", err)
	}
	var (
		out  []string
		errs []error
	)
	sc := bufio.NewScanner(bytes.NewReader(data))
	for n := 1; sc.Scan(); n++ {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		p := line
		if !filepath.IsAbs(p) {
			p = filepath.Join(d.Path, p)
		}
		if _, err := os.Stat(p); err != nil {
			errs = append(errs, fmt.Errorf("source: %s:%d: bundle %s: %w", file, n, line, err))
			continue
		}
		out = append(out, p)
	}
	if err := sc.Err(); err != nil {
		errs = append(errs, fmt.Errorf("source: %s: %w", file, err))
	}
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	return out, nil
}

// missingBundleHint adds to an error for a CUSTOM provider whose bundle is
// not loaded how to load it: with --bundle, or, for a policy directory, a
// line in its BundlesFile.
func (l *Loader) missingBundleHint(err error) error {
	var mb *engine.MissingBundleError
	if !errors.As(err, &mb) {
		return err
	}
	how := "pass it with --bundle DIR|FILE.tar.gz"
	var src PolicySource = l.cfg.Policies
	if l.feed != nil {
		src = l.feed.src
	}
	if d, ok := src.(*Dir); ok {
		how += ", or list it in " + filepath.Join(d.Path, BundlesFile)
	}
	if mb.Decision == "data.envoy.authz.allow" {
		how += " (the bundle policies/envoy in the trustmesh repository defines it)"
	}
	return fmt.Errorf("%w; to load one, %s", err, how)
}
