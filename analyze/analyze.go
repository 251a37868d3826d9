// Package analyze lints trustmesh configuration beyond validity, as
// `istioctl analyze` does for Istio: AuthorizationPolicies that the engine
// accepts but that probably do not do what their author meant, and mesh
// objects that trustmesh reads but does not honour.
//
// An Analyzer reads one Input (the policies, as the engine's own parser
// returns them, the mesh, the bundles' providers and, on a cluster, the
// objects' creation times) and returns Findings, each with a stable code
// (analyze/README.md lists them), a severity, the object and field it is
// about and a message that says what to do. An analyzer that lacks the
// input it needs (no mesh, no bundles, no cluster) returns a Note instead
// of guessing.
package analyze

import (
	"cmp"
	"slices"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
)

// Severity is how much a finding matters.
type Severity string

// The severities, from most to least severe.
const (
	SeverityError   Severity = "error"
	SeverityWarning Severity = "warning"
	SeverityInfo    Severity = "info"
)

// Rank orders severities: error 3, warning 2, info 1, anything else 0.
func (s Severity) Rank() int {
	switch s {
	case SeverityError:
		return 3
	case SeverityWarning:
		return 2
	case SeverityInfo:
		return 1
	}
	return 0
}

// Finding is one problem an analyzer found.
type Finding struct {
	Code     string   `json:"code"`             // stable, e.g. "TMA001"
	Severity Severity `json:"severity"`         //
	Object   string   `json:"object"`           // "AuthorizationPolicy foo/deny-admin"
	Origin   string   `json:"origin,omitempty"` // file (and line when known) or "cluster"
	Field    string   `json:"field,omitempty"`  // "spec.rules[0].from[0].source.principals[1]"
	Message  string   `json:"message"`          // what is wrong and what to do
}

// Input is what the analyzers read.
type Input struct {
	// Policies are the policies the engine accepts, parsed by its own
	// parser.
	Policies []*policy.Policy
	// Mesh is the mesh the policies apply to; nil makes the mesh
	// analyzers skip, with a Note.
	Mesh          *mesh.Mesh
	RootNamespace string
	TrustDomain   spiffeid.TrustDomain
	// Providers returns nil when a CUSTOM provider name is defined by a
	// loaded bundle, as the engine would accept it at load, and the
	// engine's refusal otherwise. Nil when no bundles were given: the
	// provider analyzer skips, with a Note.
	Providers func(name string) error
	// Created maps a policy's Key to its creationTimestamp. Nil off a
	// cluster: the dry-run analyzer skips, with a Note.
	Created     map[string]time.Time
	Now         time.Time
	StaleDryRun time.Duration
}

// Analyzer is one check.
type Analyzer struct {
	Code, Name, Description string
	// Run returns the findings, or a note saying why the analyzer did not
	// run (and then no findings).
	Run func(in *Input) (findings []Finding, note string)
}

// Report is the result of Run.
type Report struct {
	// Findings are sorted by object, code, field and message.
	Findings []Finding `json:"findings"`
	// Notes say which analyzers were skipped, and why.
	Notes []string `json:"notes,omitempty"`
}

// Run runs the analyzers over in. Findings without a severity or an object
// get the ones the analyzer's code implies.
func Run(in *Input, analyzers []Analyzer) Report {
	r := Report{Findings: []Finding{}}
	for _, a := range analyzers {
		fs, note := a.Run(in)
		if note != "" {
			r.Notes = append(r.Notes, a.Code+" ("+a.Name+") skipped: "+note)
		}
		for _, f := range fs {
			if f.Code == "" {
				f.Code = a.Code
			}
			r.Findings = append(r.Findings, f)
		}
	}
	Sort(r.Findings)
	return r
}

// Sort orders findings by object, code, field and message.
func Sort(fs []Finding) {
	slices.SortStableFunc(fs, func(a, b Finding) int {
		return cmp.Or(
			cmp.Compare(a.Object, b.Object),
			cmp.Compare(a.Code, b.Code),
			cmp.Compare(a.Field, b.Field),
			cmp.Compare(a.Message, b.Message),
		)
	})
}

// All is every analyzer. TMA000 is not one: the loader
// reports refused objects.
var All = []Analyzer{
	selectorsAnalyzer,
	identitiesAnalyzer,
	trustDomainAnalyzer,
	malformedPeerAnalyzer,
	deadDenyAnalyzer, shadowedAllowAnalyzer, emptyAllowAnalyzer, denyAllAnalyzer, httpOnTCPAnalyzer, httpOnAmbientAnalyzer,
	dryRunAnalyzer,
	customProviderAnalyzer,
	peerAuthAnalyzer,
	refusalsAnalyzer,
}
