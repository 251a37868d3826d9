package check

import (
	"context"
	"io"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/inspect"
	"github.com/trustmesh/trustmesh/mesh"
)

// The codes of the input checks.
const (
	CodePolicies = "TM-POL-001"
	CodeMesh     = "TM-MESH-001"
)

// checkPolicies compiles the policy directory and bundles the way serve
// and trustmesh policy compile load them (authz/inspect, over
// authz/source and the engine); the error names the file at fault.
func checkPolicies(ctx context.Context, cfg Config, r *Report) {
	if cfg.Policies == "" && len(cfg.Bundles.Paths) == 0 {
		r.add(CodePolicies, Info, "policies", "pass serve's --policies (and --bundle) to check them", "no --policies given; the policies were not checked")
		return
	}
	subject := cfg.Policies
	if subject == "" {
		subject = "bundles"
	}
	const hint = "fix the file named; serve refuses a policy set that does not compile (at start, it does not start); trustmesh policy compile shows the same error"
	bundles, err := cfg.Bundles.Configs(cfg.Policies)
	if err != nil {
		r.add(CodePolicies, Error, subject, hint, "the policies' Rego bundles cannot be loaded: %v", err)
		return
	}
	err = inspect.Compile(ctx, inspect.Config{PolicyDir: cfg.Policies, Bundles: bundles, RootNamespace: cfg.RootNamespace}, io.Discard)
	if err != nil {
		r.add(CodePolicies, Error, subject, hint, "the policies do not compile: %v", err)
		return
	}
	r.add(CodePolicies, OK, subject, "", "the policies compile")
}

// checkMesh parses the mesh directory as serve's mesh feed does (mesh.Dir)
// and validates it for the journal's trust domain as the xDS server does.
func checkMesh(cfg Config, td spiffeid.TrustDomain, r *Report) {
	if cfg.Mesh == "" {
		r.add(CodeMesh, Info, "mesh", "pass serve's --mesh to check it", "no --mesh given; the mesh files were not checked")
		return
	}
	const hint = "fix the file named; serve refuses a mesh that does not load (at start, it does not start)"
	m, err := (&mesh.Dir{Path: cfg.Mesh}).Mesh()
	if err != nil {
		r.add(CodeMesh, Error, cfg.Mesh, hint, "the mesh files do not load: %v", err)
		return
	}
	if td.IsZero() {
		r.add(CodeMesh, Warning, cfg.Mesh, "fix the journal finding above", "the mesh files load, but without the journal's trust domain they could not be validated")
		return
	}
	if err := m.Validate(td); err != nil {
		r.add(CodeMesh, Error, cfg.Mesh, hint, "the mesh is not valid for trust domain %s: %v", td, err)
		return
	}
	r.add(CodeMesh, OK, cfg.Mesh, "", "the mesh files load: %d services", len(m.Services))
}
