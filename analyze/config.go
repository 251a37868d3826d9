package analyze

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/mesh"
)

// ErrBadInput marks a configuration `trustmesh analyze` cannot analyze at
// all: no input, an unreadable path, a mesh directory or bundle that does
// not load. The command exits 2 on it.
var ErrBadInput = errors.New("analyze: bad input")

// Config is what `trustmesh analyze` analyzes: files (Files, MeshDir) or a
// cluster (Cluster), never both.
type Config struct {
	// Files are AuthorizationPolicy files and directories (-f).
	Files []string
	// MeshDir is a mesh directory, as serve's --mesh.
	MeshDir string
	// Cluster, when set, reads the policies and the mesh from a cluster.
	Cluster *ClusterConfig
	// Bundles are the Rego bundles CUSTOM providers come from; a -f
	// directory's bundles.txt adds to them.
	Bundles source.Bundles
	// RootNamespace: empty means the cluster's control plane's
	// (FindControlPlanes), else engine.DefaultRootNamespace.
	RootNamespace string
	// TrustDomain: empty means the cluster's control plane's, else
	// cluster.local.
	TrustDomain string
	// StaleDryRun: zero means DefaultStaleDryRun.
	StaleDryRun time.Duration
	// Now judges the dry-run policies' age; zero means time.Now().
	Now time.Time
	// Analyzers to run; nil means All.
	Analyzers []Analyzer
}

// DefaultTrustDomain is the trust domain assumed when none is given.
const DefaultTrustDomain = "cluster.local"

// Analyze loads the input the configuration names, with the engine's and
// the mesh's own loaders, and runs the analyzers over it. Objects the
// engine refuses are TMA000 findings, not errors; an error (wrapping
// ErrBadInput) means nothing could be analyzed.
func Analyze(ctx context.Context, cfg Config) (Report, error) {
	bad := func(format string, args ...any) (Report, error) {
		return Report{}, fmt.Errorf("%w: "+format, append([]any{ErrBadInput}, args...)...)
	}
	switch {
	case cfg.Cluster == nil && len(cfg.Files) == 0 && cfg.MeshDir == "":
		return bad("nothing to analyze: give -f DIR|FILE (and --mesh DIR), or --kubeconfig FILE")
	case cfg.Cluster != nil && (len(cfg.Files) > 0 || cfg.MeshDir != ""):
		return bad("-f and --mesh analyze files, --kubeconfig a cluster: give one or the other")
	}
	var notes []string
	if cfg.Cluster != nil {
		var note string
		cfg.RootNamespace, cfg.TrustDomain, note = controlPlaneSettings(ctx, *cfg.Cluster, cfg.RootNamespace, cfg.TrustDomain)
		notes = append(notes, note)
	}
	in := &Input{RootNamespace: cfg.RootNamespace, StaleDryRun: cfg.StaleDryRun, Now: cfg.Now}
	if in.RootNamespace == "" {
		in.RootNamespace = engine.DefaultRootNamespace
	}
	if in.StaleDryRun == 0 {
		in.StaleDryRun = DefaultStaleDryRun
	}
	if in.StaleDryRun < 0 {
		return bad("--stale-dry-run %s is negative", in.StaleDryRun)
	}
	if in.Now.IsZero() {
		in.Now = time.Now()
	}
	td := cfg.TrustDomain
	if td == "" {
		td = DefaultTrustDomain
	}
	var err error
	if in.TrustDomain, err = spiffeid.TrustDomainFromString(td); err != nil {
		return bad("--trust-domain %q: %w", td, err)
	}

	var ps *Policies
	bundles := cfg.Bundles
	if cfg.Cluster != nil {
		cc := *cfg.Cluster
		cc.TrustDomain = in.TrustDomain
		c, err := ReadCluster(ctx, cc)
		if err != nil {
			return bad("%w", err)
		}
		ps, in.Mesh, in.Created = c.Policies, c.Mesh, c.Created
	} else {
		ps = &Policies{DefaultNamespace: "default"}
		for _, f := range cfg.Files {
			if err := ps.AddPath(f); err != nil {
				return bad("-f: %w", err)
			}
			if st, err := os.Stat(f); err == nil && st.IsDir() {
				named, err := (&source.Dir{Path: f}).Bundles()
				if err != nil {
					return bad("%w", err)
				}
				bundles.Paths = append(bundles.Paths, named...)
			}
		}
		if cfg.MeshDir != "" {
			if in.Mesh, err = (&mesh.Dir{Path: cfg.MeshDir}).Mesh(); err != nil {
				return bad("--mesh %s: %w", cfg.MeshDir, err)
			}
		}
	}
	in.Policies = ps.Policies()

	bcs, err := bundles.Configs("")
	if err != nil {
		return bad("%w", err)
	}
	if len(bcs) > 0 {
		var nbs []engine.NamedBundle
		for _, bc := range bcs {
			b, err := source.LoadBundle(bc)
			if err != nil {
				return bad("%w", err)
			}
			nbs = append(nbs, engine.NamedBundle{Name: bc.Path, Bundle: b})
		}
		if in.Providers, err = EngineProviders(ctx, nbs); err != nil {
			return bad("%w", err)
		}
	}

	analyzers := cfg.Analyzers
	if analyzers == nil {
		analyzers = All
	}
	if in.Mesh == nil && ps.meshObjects > 0 {
		// The mesh objects of -f were checked, and their refusals
		// reported, as they were read: the analyzers of a mesh's refusals
		// have nothing more to say, and no note to make that they skipped.
		analyzers = slices.DeleteFunc(slices.Clone(analyzers), func(a Analyzer) bool {
			return a.Code == peerAuthAnalyzer.Code || a.Code == refusalsAnalyzer.Code
		})
	}
	rep := Run(in, analyzers)
	rep.Notes = append(notes, rep.Notes...)
	if n := ps.SkippedNote(); n != "" {
		rep.Notes = append(rep.Notes, n)
	}
	rep.Findings = append(rep.Findings, ps.Findings()...)
	Sort(rep.Findings)
	return rep, nil
}

// ParseFailOn parses --fail-on: error, warning, info or none. The result
// is the lowest severity that fails; "" for none.
func ParseFailOn(s string) (Severity, error) {
	switch Severity(s) {
	case SeverityError, SeverityWarning, SeverityInfo:
		return Severity(s), nil
	case "none":
		return "", nil
	}
	return "", fmt.Errorf("%w: --fail-on %q is not one of error, warning, info or none", ErrBadInput, s)
}

// Fails reports whether the report has a finding at or above level; never
// for level "" (none).
func (r Report) Fails(level Severity) bool {
	if level == "" {
		return false
	}
	for _, f := range r.Findings {
		if f.Severity.Rank() >= level.Rank() {
			return true
		}
	}
	return false
}

// Count returns how many findings have the severity.
func (r Report) Count(s Severity) int {
	n := 0
	for _, f := range r.Findings {
		if f.Severity == s {
			n++
		}
	}
	return n
}

// controlPlaneSettings returns the root namespace and trust domain to judge
// a cluster's policies by: each as given, else as the trustmesh control
// plane running there has it (FindControlPlanes), else the default; and a
// note that says where each came from.
func controlPlaneSettings(ctx context.Context, cc ClusterConfig, root, td string) (string, string, string) {
	var cps []ControlPlane
	var err error
	if root == "" || td == "" {
		cps, err = FindControlPlanes(ctx, cc)
	}
	var parts, defaulted []string
	for _, s := range []struct {
		name, flag, def string
		v               *string
		of              func(ControlPlane) string
	}{
		{"root namespace", "--root-namespace", engine.DefaultRootNamespace, &root, func(cp ControlPlane) string { return cp.RootNamespace }},
		{"trust domain", "--trust-domain", DefaultTrustDomain, &td, func(cp ControlPlane) string { return cp.TrustDomain }},
	} {
		if *s.v != "" {
			parts = append(parts, fmt.Sprintf("%s %s (%s)", s.name, *s.v, s.flag))
			continue
		}
		var why string
		switch {
		case err != nil:
			why = fmt.Sprintf("the control plane's flags could not be read: %v", err)
		case len(cps) == 0:
			why = "no trustmesh control plane (a Deployment running trustmesh serve behind a webhook configuration's Service) is in the cluster"
		default:
			var says []string
			for _, cp := range cps {
				if s.of(cp) != s.of(cps[0]) {
					why = "the control planes disagree"
				}
				says = append(says, fmt.Sprintf("Deployment %s has %s", cp.Deployment, s.of(cp)))
			}
			if why == "" {
				*s.v = s.of(cps[0])
				parts = append(parts, fmt.Sprintf("%s %s (the control plane's flags: %s)", s.name, *s.v, strings.Join(deployments(cps), ", ")))
				continue
			}
			why += ": " + strings.Join(says, ", ")
		}
		*s.v = s.def
		defaulted = append(defaulted, s.flag)
		parts = append(parts, fmt.Sprintf("%s %s (the default; %s)", s.name, *s.v, why))
	}
	note := strings.Join(parts, ", ")
	if len(defaulted) > 0 {
		note += "; pass " + strings.Join(defaulted, " and ") + " if the control plane's differ"
	}
	return root, td, note
}

// deployments names the control planes' Deployments.
func deployments(cps []ControlPlane) []string {
	var out []string
	for _, cp := range cps {
		out = append(out, "Deployment "+cp.Deployment)
	}
	return out
}
