package engine

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"strings"
	"sync"
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
	// Backend evaluates the AuthorizationPolicies: BackendNative (the
	// default, when empty) or BackendRego.
	Backend Backend
}

// Backend names an evaluator of AuthorizationPolicies.
type Backend string

// The back ends. Both give the same decisions (the conformance and
// differential tests hold them to it); the native one serves by default.
// CUSTOM providers' bundles are Rego whichever serves.
const (
	// BackendNative evaluates the typed model with matchers compiled at
	// Build; no Rego is compiled for AuthorizationPolicies.
	BackendNative Backend = "native"
	// BackendRego compiles every policy to Rego (authz/rego) and runs one
	// prepared OPA query per check.
	BackendRego Backend = "rego"
)

// ErrUnknownBackend is the error of a SetConfig naming no back end.
var ErrUnknownBackend = errors.New("engine: unknown back end")

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
	backend     Backend
	entries     []*entry
	byNamespace map[string][]*entry
	index       map[string]*nsIndex
	// matches is the prepared query of BackendRego.
	matches oparego.PreparedEvalQuery
	// modules (file name -> generated Rego) are generated at Build for
	// BackendRego, on first use (Modules) otherwise.
	modulesOnce sync.Once
	modules     map[string]string
	providers   map[string]*provider
	// bundles are the compiled bundles, for CheckProvider.
	bundles     *compiledBundles
	evalTimeout time.Duration
	gateways    Gateways
	version     uint64
	digest      string
	// cfg is what the set was built from, for WithBackend.
	cfg SetConfig
	// headers are the request headers some policy matches on, and used the
	// attributes: the input carries nothing else.
	headers []headerKey
	used    attrSet
}

type entry struct {
	id     *ast.Term
	idStr  string
	policy *policy.Policy
	// key is policy.Key(), and rules[i] is i: what decisions point at.
	key   string
	rules []int
	// pos is the entry's place in the set's order.
	pos int
	// selector is the policy's selector, as pairs.
	selector [][2]string
	// native is the policy compiled for BackendNative.
	native *nativePolicy
	// root marks a policy in the root namespace.
	root bool
}

// selects is policy.Selects over the pairs.
func (e *entry) selects(labels map[string]string) bool {
	for _, kv := range e.selector {
		if got, ok := labels[kv[0]]; !ok || got != kv[1] {
			return false
		}
	}
	return true
}

// Build compiles policies and bundles into a Set, preparing every query
// once. Errors name the policy or bundle at fault.
func Build(ctx context.Context, cfg SetConfig) (*Set, error) {
	s := &Set{
		root:        cfg.RootNamespace,
		backend:     cfg.Backend,
		byNamespace: map[string][]*entry{},
		evalTimeout: cfg.EvalTimeout,
		gateways:    cfg.Gateways,
		version:     cfg.PolicyVersion,
		digest:      cfg.PolicyDigest,
		cfg:         cfg,
	}
	s.cfg.Policies = slices.Clone(cfg.Policies)
	s.cfg.Bundles = slices.Clone(cfg.Bundles)
	if s.gateways == nil {
		s.gateways = GatewayIDs(nil)
	}
	if s.root == "" {
		s.root = DefaultRootNamespace
	}
	if s.evalTimeout <= 0 {
		s.evalTimeout = DefaultEvalTimeout
	}
	switch s.backend {
	case "":
		s.backend = BackendNative
	case BackendNative, BackendRego:
	default:
		return nil, fmt.Errorf("%w %q: want %q or %q", ErrUnknownBackend, s.backend, BackendNative, BackendRego)
	}
	ps := append([]*policy.Policy(nil), cfg.Policies...)
	sort.SliceStable(ps, func(i, j int) bool { return ps[i].Key() < ps[j].Key() })
	seen := map[string]bool{}
	var parsed map[string]*ast.Module
	var modules map[string]string
	if s.backend == BackendRego {
		parsed = make(map[string]*ast.Module, len(ps)+1)
		modules = make(map[string]string, len(ps)+1)
	}
	var refused []error
	for i, p := range ps {
		if seen[p.Key()] {
			return nil, fmt.Errorf("engine: %s: duplicate policy %s", p.Origin, p.Key())
		}
		seen[p.Key()] = true
		id := authzrego.ID(i)
		// The per-policy checks, the very ones CheckPolicy makes, so that
		// the admission webhook refuses what a load would refuse.
		np, err := checkPolicy(p)
		if err != nil {
			refused = append(refused, err)
			continue
		}
		e := &entry{id: ast.StringTerm(id), idStr: id, policy: p, key: p.Key(), pos: len(s.entries),
			native: np, root: p.Namespace == s.root}
		e.rules = make([]int, len(p.Rules))
		for i := range e.rules {
			e.rules[i] = i
		}
		for k, v := range p.Selector {
			e.selector = append(e.selector, [2]string{k, v})
		}
		slices.SortFunc(e.selector, func(a, b [2]string) int { return strings.Compare(a[0], b[0]) })
		s.entries = append(s.entries, e)
		s.byNamespace[p.Namespace] = append(s.byNamespace[p.Namespace], e)
		if s.backend == BackendRego {
			name := fmt.Sprintf("policy/%s.rego", id)
			src, m, err := regoModule(id, p)
			if err != nil {
				refused = append(refused, err)
				continue
			}
			parsed[name] = m
			modules[name] = src
		}
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
	s.buildIndex()
	if s.backend == BackendRego {
		if err := s.prepareRego(ctx, parsed, modules); err != nil {
			return nil, err
		}
	}

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

// CheckPolicy makes the checks Build makes of each policy on its own: a
// CUSTOM provider is named rego:<path>, and the policy compiles for the
// native back end (which a policy the parser admitted always does). Build
// refuses a set holding a policy CheckPolicy refuses, with the same error,
// which joins a *policy.FieldError for each refusal (the same type the
// parser refuses with). What only a whole set can refuse is not checked
// here: two policies of one namespace/name, and a CUSTOM provider that no
// loaded bundle defines (MissingBundleError, which Set.CheckProvider
// checks against a set's bundles). The Rego back end also refuses a policy
// whose generated Rego does not compile, which would be a bug of
// authz/rego: RegoCheckPolicy checks that.
func CheckPolicy(p *policy.Policy) error {
	_, err := checkPolicy(p)
	return err
}

// RegoCheckPolicy is CheckPolicy and the checks a BackendRego Build adds:
// the policy's generated Rego parses and compiles.
func RegoCheckPolicy(p *policy.Policy) error {
	if err := CheckPolicy(p); err != nil {
		return err
	}
	id := authzrego.ID(0)
	_, m, err := regoModule(id, p)
	if err != nil {
		return err
	}
	return compilePolicy(id, p, m)
}

// checkPolicy is CheckPolicy; it returns the policy compiled for the
// native back end.
func checkPolicy(p *policy.Policy) (*nativePolicy, error) {
	refuse := func(field string, err error) error {
		return &policy.FieldError{Origin: p.Origin, Policy: p.Key(), Field: field, Err: err}
	}
	var errs []error
	if p.Action == policy.Custom {
		if _, err := providerRef(p.Provider); err != nil {
			errs = append(errs, refuse("spec.provider.name", err))
		}
	}
	np, err := compileNative(p)
	if err != nil {
		errs = append(errs, refuse("spec", fmt.Errorf("%w: %w", policy.ErrInvalid, err)))
	}
	if len(errs) > 0 {
		return nil, errors.Join(errs...)
	}
	return np, nil
}

// regoModule returns the generated module of the policy of id in a set,
// as source and parsed; compilePolicy names the policy at fault when the
// set's compile fails.
func regoModule(id string, p *policy.Policy) (string, *ast.Module, error) {
	name := fmt.Sprintf("policy/%s.rego", id)
	src := authzrego.Module(id, p)
	m, err := ast.ParseModuleWithOpts(name, src, ast.ParserOptions{RegoVersion: ast.RegoV1})
	if err != nil {
		return "", nil, &policy.FieldError{Origin: p.Origin, Policy: p.Key(), Field: "spec",
			Err: fmt.Errorf("%w: its generated Rego does not parse: %w", policy.ErrInvalid, err)}
	}
	return src, m, nil
}

// prepareRego compiles the policies' modules with the entry module and
// prepares the query BackendRego runs per check.
func (s *Set) prepareRego(ctx context.Context, parsed map[string]*ast.Module, modules map[string]string) error {
	modules["authz.rego"] = authzrego.EntryModule()
	entry, err := ast.ParseModuleWithOpts("authz.rego", modules["authz.rego"], ast.ParserOptions{RegoVersion: ast.RegoV1})
	if err != nil {
		return fmt.Errorf("engine: generated authz.rego: %w", err)
	}
	parsed["authz.rego"] = entry
	c := ast.NewCompiler()
	if c.Compile(parsed); c.Failed() {
		// Name the policy at fault, as RegoCheckPolicy does.
		var errs []error
		for _, e := range s.entries {
			name := fmt.Sprintf("policy/%s.rego", e.idStr)
			m, err := ast.ParseModuleWithOpts(name, modules[name], ast.ParserOptions{RegoVersion: ast.RegoV1})
			if err == nil {
				err = compilePolicy(e.idStr, e.policy, m)
			}
			errs = append(errs, err)
		}
		if err := errors.Join(errs...); err != nil {
			return err
		}
		return fmt.Errorf("engine: compiling generated Rego: %w", c.Errors)
	}
	pq, err := oparego.New(oparego.Compiler(c), oparego.Query(authzrego.MatchesQuery)).PrepareForEval(ctx)
	if err != nil {
		return fmt.Errorf("engine: preparing %s: %w", authzrego.MatchesQuery, err)
	}
	s.matches = pq
	s.modulesOnce.Do(func() { s.modules = modules })
	return nil
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
// compile` prints it: the modules BackendRego serves with, generated on
// first use when the native back end serves.
func (s *Set) Modules() map[string]string {
	s.modulesOnce.Do(func() {
		s.modules = make(map[string]string, len(s.entries)+1)
		for _, e := range s.entries {
			s.modules[fmt.Sprintf("policy/%s.rego", e.idStr)] = authzrego.Module(e.idStr, e.policy)
		}
		s.modules["authz.rego"] = authzrego.EntryModule()
	})
	return s.modules
}

// Backend is the back end that evaluates the set's policies.
func (s *Set) Backend() Backend { return s.backend }

// WithBackend builds the set again, from the same configuration, for back
// end b: the tests hold the back ends to each other with it.
func (s *Set) WithBackend(ctx context.Context, b Backend) (*Set, error) {
	cfg := s.cfg
	cfg.Backend = b
	return Build(ctx, cfg)
}

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
// labels. The order is the set's order, the root namespace's first.
func (s *Set) applicable(w Workload) []*entry {
	return s.applicableInto(nil, w)
}

// applicableInto is applicable appending to out.
func (s *Set) applicableInto(out []*entry, w Workload) []*entry {
	if w.Namespace != s.root {
		out = s.index[s.root].appendSelected(out, w.Labels)
	}
	return s.index[w.Namespace].appendSelected(out, w.Labels)
}

// nsIndex finds a namespace's policies that select a workload without
// trying every selector: a policy with a selector is filed under the
// value of its selector's first label (by name), so only the policies
// filed under the workload's own values of those labels, and those that
// select every workload, are tried.
type nsIndex struct {
	all []*entry
	// every are the policies that select every workload.
	every []*entry
	// labels are the label names policies are filed under, and byLabel
	// the policies by name and value; each list is in the set's order.
	labels  []string
	byLabel map[string]map[string][]*entry
}

// maxIndexLabels bounds the label names a namespace's index merges at
// once; with more, it tries every policy.
const maxIndexLabels = 8

func (s *Set) buildIndex() {
	s.index = make(map[string]*nsIndex, len(s.byNamespace))
	for ns, es := range s.byNamespace {
		x := &nsIndex{all: es, byLabel: map[string]map[string][]*entry{}}
		for _, e := range es {
			if len(e.selector) == 0 {
				x.every = append(x.every, e)
				continue
			}
			k, v := e.selector[0][0], e.selector[0][1]
			if x.byLabel[k] == nil {
				x.byLabel[k] = map[string][]*entry{}
				x.labels = append(x.labels, k)
			}
			x.byLabel[k][v] = append(x.byLabel[k][v], e)
		}
		sort.Strings(x.labels)
		s.index[ns] = x
	}
}

// appendSelected appends the namespace's policies that select labels, in
// the set's order.
func (x *nsIndex) appendSelected(out []*entry, labels map[string]string) []*entry {
	if x == nil {
		return out
	}
	if len(x.labels) > maxIndexLabels {
		for _, e := range x.all {
			if e.selects(labels) {
				out = append(out, e)
			}
		}
		return out
	}
	// Merge the candidate lists by position.
	var lists [maxIndexLabels + 1][]*entry
	n := 0
	if len(x.every) > 0 {
		lists[n] = x.every
		n++
	}
	for _, k := range x.labels {
		v, ok := labels[k]
		if !ok {
			continue
		}
		if l := x.byLabel[k][v]; len(l) > 0 {
			lists[n] = l
			n++
		}
	}
	for {
		best := -1
		for i := 0; i < n; i++ {
			if len(lists[i]) > 0 && (best < 0 || lists[i][0].pos < lists[best][0].pos) {
				best = i
			}
		}
		if best < 0 {
			return out
		}
		e := lists[best][0]
		lists[best] = lists[best][1:]
		if e.selects(labels) {
			out = append(out, e)
		}
	}
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
