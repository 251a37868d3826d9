package access

import (
	"context"
	"fmt"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/decisionlog"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/mesh"
)

// LoadConfig names the files `trustmesh policy who-can` reads.
type LoadConfig struct {
	PolicyDir string
	// Bundles serve the CUSTOM providers the policies name: a policy set
	// whose provider no bundle defines is refused, as the server refuses
	// it.
	Bundles       []source.BundleConfig
	MeshDir       string
	RootNamespace string
	// TrustDomain the mesh's identities must belong to (the mesh is
	// validated against it, as serve validates it); empty means
	// DefaultTrustDomain.
	TrustDomain string
	// Redact, when set, redacts the values conditions quote (Options).
	Redact *decisionlog.Redactor
}

// DefaultTrustDomain is the trust domain Load validates the mesh against
// when none is given: serve's default.
const DefaultTrustDomain = "cluster.local"

// Load reads the policies and the mesh as the server would: the policies
// through the same loader and engine build (so a set the server refuses
// is refused here), the mesh from its directory, validated. Every error
// wraps ErrInput.
func Load(ctx context.Context, cfg LoadConfig) (*Matrix, error) {
	if cfg.PolicyDir == "" {
		return nil, fmt.Errorf("%w: --policies DIR is required", ErrInput)
	}
	if cfg.MeshDir == "" {
		return nil, fmt.Errorf("%w: --mesh DIR is required", ErrInput)
	}
	td := cfg.TrustDomain
	if td == "" {
		td = DefaultTrustDomain
	}
	if _, err := spiffeid.TrustDomainFromString(td); err != nil {
		return nil, fmt.Errorf("%w: trust domain: %w", ErrInput, err)
	}
	l, err := source.New(source.Config{Engine: engine.New(), Policies: &source.Dir{Path: cfg.PolicyDir, DefaultNamespace: "default"},
		Bundles: cfg.Bundles, RootNamespace: cfg.RootNamespace})
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInput, err)
	}
	set, err := l.Build(ctx)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInput, err)
	}
	m, err := (&mesh.Dir{Path: cfg.MeshDir}).Mesh()
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrInput, err)
	}
	return Compute(set.Policies(), m, Options{RootNamespace: cfg.RootNamespace, TrustDomain: td, PolicyVersion: set.PolicyVersion(), Redact: cfg.Redact})
}
