package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	oparego "github.com/open-policy-agent/opa/v1/rego"

	"github.com/trustmesh/trustmesh/authz/policy"
	authzrego "github.com/trustmesh/trustmesh/authz/rego"
)

// DefaultRootNamespace is Istio's default root namespace, whose policies
// apply mesh-wide.
const DefaultRootNamespace = "istio-system"

// ErrUnknownProvider marks a CUSTOM policy that names a provider no loaded
// bundle serves.
var ErrUnknownProvider = errors.New("unknown extension provider")

// SetConfig is the input of Build.
type SetConfig struct {
	// RootNamespace holds the mesh-wide policies; empty means
	// DefaultRootNamespace.
	RootNamespace string
	Policies      []*policy.Policy
	// Bundles are the Rego bundles CUSTOM providers come from; Name is the
	// bundle's origin for error messages.
	Bundles []NamedBundle
	// EvalTimeout bounds each evaluation of a bundle's Rego; zero means
	// DefaultEvalTimeout.
	EvalTimeout time.Duration
	// Gateways tells which SPIFFE IDs are the mesh's gateways, for
	// remote.ip (see RemoteIP); nil means the mesh has none.
	Gateways Gateways
	// PolicyVersion and PolicyDigest name the policy snapshot the
	// Policies come from (authz/source.Snapshot); every decision the Set
	// makes carries them.
	PolicyVersion uint64
	PolicyDigest  string
}

// NamedBundle is a loaded OPA bundle and where it came from.
type NamedBundle struct {
	Name   string
	Bundle *bundle.Bundle
}

// DefaultEvalTimeout bounds a bundle evaluation when no timeout is set.
const DefaultEvalTimeout = 100 * time.Millisecond

// Set is an immutable, fully compiled policy set. Build either returns a
// Set that can serve or an error; a half-built Set never exists.
type Set struct {
	root        string
	entries     []*entry
	byNamespace map[string][]*entry
	matches     oparego.PreparedEvalQuery
	modules     map[string]string // file name -> generated Rego
	providers   map[string]*provider
	evalTimeout time.Duration
	gateways    Gateways
	version     uint64
	digest      string
	// headers are the request headers some policy matches on, and used the
	// attributes: the input carries nothing else.
	headers []headerKey
	used    attrSet
}

type entry struct {
	id     *ast.Term
	idStr  string
	policy *policy.Policy
	// root marks a policy in the root namespace.
	root bool
}

// Build compiles policies and bundles into a Set, preparing every query
// once. Errors name the policy or bundle at fault.
func Build(ctx context.Context, cfg SetConfig) (*Set, error) {
	s := &Set{
		root:        cfg.RootNamespace,
		byNamespace: map[string][]*entry{},
		modules:     map[string]string{},
		evalTimeout: cfg.EvalTimeout,
		gateways:    cfg.Gateways,
		version:     cfg.PolicyVersion,
		digest:      cfg.PolicyDigest,
	}
	if s.gateways == nil {
		s.gateways = GatewayIDs(nil)
	}
	if s.root == "" {
		s.root = DefaultRootNamespace
	}
	if s.evalTimeout <= 0 {
		s.evalTimeout = DefaultEvalTimeout
	}
	ps := append([]*policy.Policy(nil), cfg.Policies...)
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Key() < ps[j].Key() })
	seen := map[string]bool{}
	for i, p := range ps {
		if seen[p.Key()] {
			return nil, fmt.Errorf("engine: %s: duplicate policy %s", p.Origin, p.Key())
		}
		seen[p.Key()] = true
		id := authzrego.ID(i)
		e := &entry{id: ast.StringTerm(id), idStr: id, policy: p, root: p.Namespace == s.root}
		s.entries = append(s.entries, e)
		s.byNamespace[p.Namespace] = append(s.byNamespace[p.Namespace], e)
		s.modules[fmt.Sprintf("policy/%s.rego", id)] = authzrego.Module(id, p)
		for _, r := range p.Rules {
			r.EachField(func(f policy.Field) {
				s.used = s.used.with(f.Attr)
				if f.Attr == policy.SourceNamespace || f.Attr == policy.SourceServiceAccount {
					// Matched on the whole SPIFFE ID outside ALLOW.
					s.used = s.used.with(policy.SourcePrincipal)
				}
				if f.Attr == policy.Header && !slices.ContainsFunc(s.headers, func(h headerKey) bool { return h.name == f.HeaderName }) {
					s.headers = append(s.headers, headerKey{name: f.HeaderName, key: ast.StringTerm(authzrego.InputKey(f))})
				}
			})
		}
	}
	s.modules["authz.rego"] = authzrego.EntryModule()

	parsed := make(map[string]*ast.Module, len(s.modules))
	for name, src := range s.modules {
		m, err := ast.ParseModuleWithOpts(name, src, ast.ParserOptions{RegoVersion: ast.RegoV1})
		if err != nil {
			return nil, fmt.Errorf("engine: generated %s: %w", name, err)
		}
		parsed[name] = m
	}
	c := ast.NewCompiler()
	if c.Compile(parsed); c.Failed() {
		return nil, fmt.Errorf("engine: compiling generated Rego: %w", c.Errors)
	}
	pq, err := oparego.New(oparego.Compiler(c), oparego.Query(authzrego.MatchesQuery)).PrepareForEval(ctx)
	if err != nil {
		return nil, fmt.Errorf("engine: preparing %s: %w", authzrego.MatchesQuery, err)
	}
	s.matches = pq

	bs, err := compileBundles(cfg.Bundles)
	if err != nil {
		return nil, err
	}
	s.providers = map[string]*provider{}
	for _, e := range s.entries {
		p := e.policy
		if p.Action != policy.Custom {
			continue
		}
		if _, ok := s.providers[p.Provider]; ok {
			continue
		}
		prov, err := bs.provider(ctx, p.Provider)
		if err != nil {
			return nil, fmt.Errorf("engine: %s: %s: spec.provider.name: %w", p.Origin, p.Key(), err)
		}
		s.providers[p.Provider] = prov
	}
	return s, nil
}

// Modules returns the generated Rego by file name, as `trustmesh policy
// compile` prints it.
func (s *Set) Modules() map[string]string { return s.modules }

// PolicyVersion is the version of the policy snapshot the Set was built
// from (SetConfig.PolicyVersion).
func (s *Set) PolicyVersion() uint64 { return s.version }

// Policies returns the policies of the set in evaluation order.
func (s *Set) Policies() []*policy.Policy {
	out := make([]*policy.Policy, len(s.entries))
	for i, e := range s.entries {
		out[i] = e.policy
	}
	return out
}

// applicable returns the policies that apply to the workload: those of the
// root namespace and of the workload's namespace whose selector matches its
// labels. The order is the set's order.
func (s *Set) applicable(w Workload) []*entry {
	var out []*entry
	add := func(es []*entry) {
		for _, e := range es {
			if e.policy.Selects(w.Labels) {
				out = append(out, e)
			}
		}
	}
	if w.Namespace != s.root {
		add(s.byNamespace[s.root])
	}
	add(s.byNamespace[w.Namespace])
	return out
}

// providerRef turns "rego:envoy/authz/allow" into data.envoy.authz.allow.
func providerRef(name string) (ast.Ref, error) {
	path, ok := strings.CutPrefix(name, "rego:")
	if !ok || path == "" {
		return nil, fmt.Errorf("%w: %q: providers are Rego decisions named rego:<path>, e.g. rego:envoy/authz/allow", ErrUnknownProvider, name)
	}
	ref := ast.DefaultRootRef.Copy()
	for _, seg := range strings.Split(strings.Trim(path, "/"), "/") {
		if seg == "" {
			return nil, fmt.Errorf("%w: %q: empty path segment", ErrUnknownProvider, name)
		}
		ref = append(ref, ast.StringTerm(seg))
	}
	return ref, nil
}
