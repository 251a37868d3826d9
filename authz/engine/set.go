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
	// bundles are the compiled bundles, for CheckProvider.
	bundles     *compiledBundles
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
	parsed := make(map[string]*ast.Module, len(ps)+1)
	var refused []error
	for i, p := range ps {
		if seen[p.Key()] {
			return nil, fmt.Errorf("engine: %s: duplicate policy %s", p.Origin, p.Key())
		}
		seen[p.Key()] = true
		id := authzrego.ID(i)
		// The per-policy checks, the very ones CheckPolicy makes, so that
		// the admission webhook refuses what a load would refuse.
		src, m, err := checkPolicy(id, p)
		if err != nil {
			refused = append(refused, err)
			continue
		}
		e := &entry{id: ast.StringTerm(id), idStr: id, policy: p, root: p.Namespace == s.root}
		s.entries = append(s.entries, e)
		s.byNamespace[p.Namespace] = append(s.byNamespace[p.Namespace], e)
		name := fmt.Sprintf("policy/%s.rego", id)
		s.modules[name] = src
		parsed[name] = m
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
	if len(refused) > 0 {
		return nil, errors.Join(refused...)
	}
	s.modules["authz.rego"] = authzrego.EntryModule()
	entry, err := ast.ParseModuleWithOpts("authz.rego", s.modules["authz.rego"], ast.ParserOptions{RegoVersion: ast.RegoV1})
	if err != nil {
		return nil, fmt.Errorf("engine: generated authz.rego: %w", err)
	}
	parsed["authz.rego"] = entry
	c := ast.NewCompiler()
	if c.Compile(parsed); c.Failed() {
		// Name the policy at fault, as CheckPolicy does.
		var errs []error
		for _, e := range s.entries {
			name := fmt.Sprintf("policy/%s.rego", e.idStr)
			m, err := ast.ParseModuleWithOpts(name, s.modules[name], ast.ParserOptions{RegoVersion: ast.RegoV1})
			if err == nil {
				err = compilePolicy(e.idStr, e.policy, m)
			}
			errs = append(errs, err)
		}
		if err := errors.Join(errs...); err != nil {
			return nil, err
		}
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
	s.bundles = bs
	s.providers = map[string]*provider{}
	for _, e := range s.entries {
		p := e.policy
		if p.Action != policy.Custom {
			continue
		}
		if _, ok := s.providers[p.Provider]; ok {
			continue
		}
		if _, err := bs.decision(p.Provider); err != nil {
			return nil, refuseProvider(p, err)
		}
		prov, err := bs.provider(ctx, p.Provider)
		if err != nil {
			return nil, fmt.Errorf("engine: %s: %s: spec.provider.name: %w", p.Origin, p.Key(), err)
		}
		s.providers[p.Provider] = prov
	}
	return s, nil
}

// CheckPolicy makes the checks Build makes of each policy on its own: the
// policy's generated Rego parses and compiles, and a CUSTOM provider is
// named rego:<path>. Build refuses a set holding a policy CheckPolicy
// refuses, with the same error, which joins a *policy.FieldError for each
// refusal (the same type the parser refuses with). What only a whole set
// can refuse is not checked here: two policies of one namespace/name, and a
// CUSTOM provider that no loaded bundle defines (MissingBundleError,
// which Set.CheckProvider checks against a set's bundles).
func CheckPolicy(p *policy.Policy) error {
	id := authzrego.ID(0)
	_, m, err := checkPolicy(id, p)
	if err != nil {
		return err
	}
	return compilePolicy(id, p, m)
}

// checkPolicy is CheckPolicy for the policy of id in a set but for the
// compile, which Build makes of the whole set at once (compilePolicy
// names the policy at fault when that fails); it returns the policy's
// generated module, as source and parsed.
func checkPolicy(id string, p *policy.Policy) (string, *ast.Module, error) {
	refuse := func(field string, err error) error {
		return &policy.FieldError{Origin: p.Origin, Policy: p.Key(), Field: field, Err: err}
	}
	var errs []error
	if p.Action == policy.Custom {
		if _, err := providerRef(p.Provider); err != nil {
			errs = append(errs, refuse("spec.provider.name", err))
		}
	}
	name := fmt.Sprintf("policy/%s.rego", id)
	src := authzrego.Module(id, p)
	m, err := ast.ParseModuleWithOpts(name, src, ast.ParserOptions{RegoVersion: ast.RegoV1})
	if err != nil {
		errs = append(errs, refuse("spec", fmt.Errorf("%w: its generated Rego does not parse: %w", policy.ErrInvalid, err)))
	}
	if len(errs) > 0 {
		return "", nil, errors.Join(errs...)
	}
	return src, m, nil
}

// compilePolicy compiles the module of one policy on its own. Each policy's
// module is a package of its own that reads only input, so a set compiles
// when each of its policies does.
func compilePolicy(id string, p *policy.Policy, m *ast.Module) error {
	c := ast.NewCompiler()
	if c.Compile(map[string]*ast.Module{fmt.Sprintf("policy/%s.rego", id): m.Copy()}); c.Failed() {
		return &policy.FieldError{Origin: p.Origin, Policy: p.Key(), Field: "spec",
			Err: fmt.Errorf("%w: its generated Rego does not compile: %w", policy.ErrInvalid, c.Errors)}
	}
	return nil
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
