package engine

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	oparego "github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"github.com/open-policy-agent/opa/v1/topdown"
	"github.com/open-policy-agent/opa/v1/util"
	"google.golang.org/protobuf/encoding/protojson"

	"github.com/trustmesh/trustmesh/authz/policy"
)

// Sandbox returns the capabilities bundles are compiled with: OPA's own,
// less http.send, every net.* builtin and opa.runtime, so a bundle can
// neither reach the network nor read the process environment. A bundle that
// calls one of them is refused at load.
func Sandbox() *ast.Capabilities {
	caps := ast.CapabilitiesForThisVersion()
	kept := caps.Builtins[:0]
	for _, b := range caps.Builtins {
		if denied(b.Name) {
			continue
		}
		kept = append(kept, b)
	}
	caps.Builtins = kept
	return caps
}

func denied(name string) bool {
	return name == "http.send" || name == "opa.runtime" || strings.HasPrefix(name, "net.")
}

// compiledBundles is every loaded bundle compiled together.
type compiledBundles struct {
	compiler *ast.Compiler
	data     map[string]any
	timeout  time.Duration
}

func compileBundles(bs []NamedBundle) (*compiledBundles, error) {
	modules := map[string]*ast.Module{}
	data := map[string]any{}
	for _, nb := range bs {
		for _, mf := range nb.Bundle.Modules {
			if mf.Parsed == nil {
				return nil, fmt.Errorf("engine: bundle %s: %s: module not parsed", nb.Name, mf.Path)
			}
			modules[nb.Name+":"+mf.Path] = mf.Parsed
		}
		if err := mergeData(data, nb.Bundle.Data, ""); err != nil {
			return nil, fmt.Errorf("engine: bundle %s: %w", nb.Name, err)
		}
	}
	c := ast.NewCompiler().WithCapabilities(Sandbox())
	if c.Compile(modules); c.Failed() {
		return nil, fmt.Errorf("engine: compiling bundles: %w", c.Errors)
	}
	return &compiledBundles{compiler: c, data: data}, nil
}

func mergeData(dst, src map[string]any, path string) error {
	for k, v := range src {
		p := path + "/" + k
		old, ok := dst[k]
		if !ok {
			dst[k] = v
			continue
		}
		om, ok1 := old.(map[string]any)
		nm, ok2 := v.(map[string]any)
		if !ok1 || !ok2 {
			return fmt.Errorf("data %s is defined by more than one bundle", p)
		}
		if err := mergeData(om, nm, p); err != nil {
			return err
		}
	}
	return nil
}

// MissingBundleError is a CUSTOM provider whose Rego decision no loaded
// bundle defines. It is an ErrUnknownProvider; whoever loads bundles knows
// how to add one, and says so.
type MissingBundleError struct {
	// Provider is the provider's name, e.g. rego:envoy/authz/allow.
	Provider string
	// Decision is the Rego reference it needs, e.g. data.envoy.authz.allow.
	Decision string
}

func (e *MissingBundleError) Error() string {
	return fmt.Sprintf("%s: %q: this CUSTOM provider needs a Rego bundle that defines %s, and no loaded bundle does",
		ErrUnknownProvider, e.Provider, e.Decision)
}

// Is makes a MissingBundleError an ErrUnknownProvider.
func (e *MissingBundleError) Is(target error) bool { return target == ErrUnknownProvider }

// provider is a Rego decision served as a CUSTOM extension provider.
type provider struct {
	name  string
	query oparego.PreparedEvalQuery
	// reads is what the bundles' rules read of input (nil: everything);
	// evalRequest builds no more than that.
	reads *inputReads
}

// decision returns the Rego reference of a provider the bundles define:
// the check Build makes of every CUSTOM policy's provider, and
// Set.CheckProvider makes of one.
func (cb *compiledBundles) decision(name string) (ast.Ref, error) {
	ref, err := providerRef(name)
	if err != nil {
		return nil, err
	}
	if len(cb.compiler.GetRulesWithPrefix(ref)) == 0 && !dataHas(cb.data, ref) {
		return nil, &MissingBundleError{Provider: name, Decision: ref.String()}
	}
	return ref, nil
}

// refuseProvider is the refusal of a CUSTOM policy whose provider the
// bundles do not define (decision's error), as a field of the policy.
func refuseProvider(p *policy.Policy, err error) error {
	return &policy.FieldError{Origin: p.Origin, Policy: p.Key(), Field: "spec.provider.name", Err: err}
}

// CheckProvider makes the check Build makes of a CUSTOM policy's provider,
// against the bundles this set was built with: a provider no bundle
// defines is refused with the very error Build refuses a set holding the
// policy with (a *policy.FieldError of spec.provider.name wrapping a
// MissingBundleError). Policies of other actions pass. It is what the
// admission webhook asks of the set in force; a set built with no bundles
// refuses every CUSTOM policy, as a load without bundles does.
func (s *Set) CheckProvider(p *policy.Policy) error {
	if p.Action != policy.Custom {
		return nil
	}
	if _, err := s.bundles.decision(p.Provider); err != nil {
		return refuseProvider(p, err)
	}
	return nil
}

func (cb *compiledBundles) provider(ctx context.Context, name string) (*provider, error) {
	ref, err := cb.decision(name)
	if err != nil {
		return nil, err
	}
	pq, err := oparego.New(
		oparego.Compiler(cb.compiler),
		oparego.Store(inmem.NewFromObject(cb.data)),
		oparego.Query(ref.String()),
		oparego.Capabilities(Sandbox()),
	).PrepareForEval(ctx)
	if err != nil {
		return nil, fmt.Errorf("preparing provider %q: %w", name, err)
	}
	return &provider{name: name, query: pq, reads: readsOfModules(cb.compiler.Modules)}, nil
}

func dataHas(data map[string]any, ref ast.Ref) bool {
	var cur any = data
	for _, t := range ref[1:] {
		m, ok := cur.(map[string]any)
		if !ok {
			return false
		}
		s, ok := t.Value.(ast.String)
		if !ok {
			return false
		}
		if cur, ok = m[string(s)]; !ok {
			return false
		}
	}
	return true
}

// Errors a provider evaluation can end with; all of them deny.
var (
	ErrUndefinedDecision = errors.New("provider decision is undefined")
	ErrBadDecision       = errors.New("provider decision is malformed")
	ErrEvalTimeout       = errors.New("provider evaluation ran out of time")
)

// ProviderResult is what a CUSTOM provider decided, with the response
// parts opa-envoy-plugin lets a decision carry.
type ProviderResult struct {
	Allowed bool
	// Headers go to the upstream on allow and to the client on deny.
	Headers              []Header
	ResponseHeadersToAdd []Header
	HTTPStatus           int
	Body                 string
}

// Header is one header a decision adds.
type Header struct {
	Key   string `json:"key"`
	Value string `json:"value"`
}

// evalRequest asks the provider about req, whose path normalizes to
// normalizedPath. The input is built as a Rego value straight from the
// proto, reduced to what the bundles' rules can read (envoyInputReads),
// and evaluated by the query prepared when the set was built.
func (p *provider) evalRequest(ctx context.Context, req *authv3.CheckRequest, normalizedPath string, timeout time.Duration) (*ProviderResult, error) {
	input, err := envoyInputReads(req, normalizedPath, p.reads)
	if err != nil {
		return nil, err
	}
	return p.eval(ctx, input, timeout)
}

// eval evaluates the prepared query on input, cancelled when timeout
// runs out or ctx ends. The cancellation is OPA's own (topdown.Cancel),
// set by a timer and by ctx: without it, OPA starts a goroutine per
// evaluation to watch ctx, and the timeout needs a context and a timer of
// its own on every call.
func (p *provider) eval(ctx context.Context, input ast.Value, timeout time.Duration) (*ProviderResult, error) {
	if input == nil {
		// A policy evaluated without input could allow through "not deny".
		return nil, errors.New("authz: no input to evaluate the provider on")
	}
	c := topdown.NewCancel()
	var timedOut atomic.Bool
	timer := time.AfterFunc(timeout, func() {
		timedOut.Store(true)
		c.Cancel()
	})
	stop := context.AfterFunc(ctx, c.Cancel)
	rs, err := p.query.Eval(ctx, oparego.EvalParsedInput(input), oparego.EvalMetrics(noMetrics), oparego.EvalExternalCancel(c))
	timer.Stop()
	stop()
	if err != nil {
		if timedOut.Load() || ctx.Err() != nil {
			return nil, fmt.Errorf("%w (%v): %w", ErrEvalTimeout, timeout, err)
		}
		return nil, err
	}
	if len(rs) == 0 || len(rs[0].Expressions) == 0 {
		return nil, ErrUndefinedDecision
	}
	return parseDecision(rs[0].Expressions[0].Value)
}

// parseDecision accepts a boolean or an object with allowed, headers,
// response_headers_to_add, http_status and body, as opa-envoy-plugin does.
func parseDecision(v any) (*ProviderResult, error) {
	switch d := v.(type) {
	case bool:
		return &ProviderResult{Allowed: d, HTTPStatus: http.StatusForbidden}, nil
	case map[string]any:
		out := &ProviderResult{HTTPStatus: http.StatusForbidden}
		allowed, ok := d["allowed"].(bool)
		if !ok {
			return nil, fmt.Errorf("%w: \"allowed\" must be a boolean", ErrBadDecision)
		}
		out.Allowed = allowed
		var err error
		if out.Headers, err = decisionHeaders(d, "headers"); err != nil {
			return nil, err
		}
		if out.ResponseHeadersToAdd, err = decisionHeaders(d, "response_headers_to_add"); err != nil {
			return nil, err
		}
		if s, ok := d["http_status"]; ok {
			n, ok := s.(json.Number)
			code, err := n.Int64()
			if !ok || err != nil || http.StatusText(int(code)) == "" {
				return nil, fmt.Errorf("%w: \"http_status\" must be an HTTP status code, got %v", ErrBadDecision, s)
			}
			out.HTTPStatus = int(code)
		}
		if b, ok := d["body"]; ok {
			s, ok := b.(string)
			if !ok {
				return nil, fmt.Errorf("%w: \"body\" must be a string", ErrBadDecision)
			}
			out.Body = s
		}
		return out, nil
	}
	return nil, fmt.Errorf("%w: want a boolean or an object, got %T", ErrBadDecision, v)
}

// decisionHeaders reads an object of header values (strings or arrays of
// strings), or an array of such objects.
func decisionHeaders(d map[string]any, field string) ([]Header, error) {
	v, ok := d[field]
	if !ok {
		return nil, nil
	}
	var objs []map[string]any
	switch x := v.(type) {
	case map[string]any:
		objs = []map[string]any{x}
	case []any:
		for _, e := range x {
			m, ok := e.(map[string]any)
			if !ok {
				return nil, fmt.Errorf("%w: %q must hold objects", ErrBadDecision, field)
			}
			objs = append(objs, m)
		}
	default:
		return nil, fmt.Errorf("%w: %q must be an object or an array of objects", ErrBadDecision, field)
	}
	var out []Header
	for _, m := range objs {
		for _, k := range sortedKeys(m) {
			switch val := m[k].(type) {
			case string:
				out = append(out, Header{Key: k, Value: val})
			case []any:
				for _, e := range val {
					s, ok := e.(string)
					if !ok {
						return nil, fmt.Errorf("%w: %q: header %q: values must be strings", ErrBadDecision, field, k)
					}
					out = append(out, Header{Key: k, Value: s})
				}
			default:
				return nil, fmt.Errorf("%w: %q: header %q: value must be a string or an array of strings", ErrBadDecision, field, k)
			}
		}
	}
	return out, nil
}

// EnvoyInput builds the input opa-envoy-plugin gives its policies, so that
// they run unchanged: the CheckRequest in protojson (input.attributes, ...),
// version, parsed_path, parsed_query, parsed_body and truncated_body.
//
// One difference: parsed_path is split from the normalized path
// (authz/pathnorm) rather than from Go's url.Parse of the raw path, so a
// bundle sees the same path as AuthorizationPolicies and the upstream. For
// a path Envoy has already normalized the two agree.
func EnvoyInput(req *authv3.CheckRequest, normalizedPath string) (map[string]any, error) {
	bs, err := protojson.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	var input map[string]any
	if err := util.UnmarshalJSON(bs, &input); err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	input["version"] = map[string]any{"ext_authz": "v3", "encoding": "protojson"}
	h := req.GetAttributes().GetRequest().GetHttp()
	segs := pathSegments(normalizedPath)
	parsedPath := make([]any, len(segs))
	for i, s := range segs {
		parsedPath[i] = s
	}
	input["parsed_path"] = parsedPath
	vals, err := queryValues(h.GetPath())
	if err != nil {
		return nil, err
	}
	parsedQuery := map[string]any{}
	for k, vs := range vals {
		a := make([]any, len(vs))
		for i, v := range vs {
			a[i] = v
		}
		parsedQuery[k] = a
	}
	input["parsed_query"] = parsedQuery
	body, truncated, err := parsedBody(h)
	if err != nil {
		return nil, err
	}
	input["parsed_body"] = body
	input["truncated_body"] = truncated
	return input, nil
}

func parsedBody(h *authv3.AttributeContext_HttpRequest) (any, bool, error) {
	ct := h.GetHeaders()["content-type"]
	if !strings.Contains(ct, "application/json") || h.GetBody() == "" {
		return nil, false, nil
	}
	if cl, ok := h.GetHeaders()["content-length"]; ok {
		n, err := strconv.ParseInt(cl, 10, 64)
		if err != nil {
			return nil, false, fmt.Errorf("engine: content-length: %w", err)
		}
		if n != -1 && n > int64(len(h.GetBody())) {
			return nil, true, nil
		}
	}
	var v any
	if err := util.UnmarshalJSON([]byte(h.GetBody()), &v); err != nil {
		return nil, false, fmt.Errorf("engine: parsing JSON body: %w", err)
	}
	return v, false, nil
}
