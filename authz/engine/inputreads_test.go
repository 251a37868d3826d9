package engine

import (
	"context"
	"math/rand/v2"
	"sort"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
	"google.golang.org/protobuf/types/known/timestamppb"
)

// readsCases are policies and what they read of input, as paths with
// "*" marking a subtree read whole; "everything" is a nil *inputReads.
var readsCases = []struct {
	name, rego string
	want       []string
}{
	{"sample", sampleRego, []string{"attributes.request.http.method.*", "attributes.source.principal.*", "parsed_path.*"}},
	{"dynamic key", `package envoy.authz
default allow := false
allow if { some k; startswith(input.attributes.request.http.headers[k], "x") }`,
		[]string{"attributes.request.http.headers.*"}},
	{"constant keys", `package envoy.authz
default allow := false
allow if { input.attributes.request.http.headers["x-tenant"] == "a"; input.attributes.request.http.headers["x-user"] }`,
		[]string{"attributes.request.http.headers.x-tenant.*", "attributes.request.http.headers.x-user.*"}},
	{"ref inside a ref", `package envoy.authz
default allow := false
allow if input.attributes.contextExtensions[input.parsed_query.k[0]] == "1"`,
		[]string{"attributes.contextExtensions.*", "parsed_query.k.*"}},
	{"input as a value", `package envoy.authz
default allow := false
allow if { x := input; x.parsed_path[0] == "a" }`, nil},
	{"input to a function", `package envoy.authz
default allow := false
allow if count(input) > 0`, nil},
	{"with input", `package envoy.authz
p if input.a
default allow := false
allow if p with input as {"a": true}`, nil},
	{"body and else", `package envoy.authz
default allow := false
allow if input.parsed_body.user == "a"
else := input.truncated_body`, []string{"parsed_body.user.*", "truncated_body.*"}},
	{"nothing", `package envoy.authz
allow := true`, []string{}},
}

func compileRego(tb testing.TB, src string) *compiledBundles {
	tb.Helper()
	m, err := ast.ParseModuleWithOpts("policy.rego", src, ast.ParserOptions{RegoVersion: ast.RegoV1})
	if err != nil {
		tb.Fatal(err)
	}
	cb, err := compileBundles([]NamedBundle{{Name: "envoy", Bundle: &bundle.Bundle{
		Modules: []bundle.ModuleFile{{Path: "policy.rego", Parsed: m}},
		Data:    map[string]any{},
	}}})
	if err != nil {
		tb.Fatal(err)
	}
	return cb
}

func (n *inputReads) paths(prefix string, out []string) []string {
	if n.whole {
		return append(out, prefix+"*")
	}
	for k, c := range n.fields {
		out = c.paths(prefix+k+".", out)
	}
	return out
}

// TestReadsOfModules: what a policy reads of input is found from its
// compiled rules, up to the first element that is not a constant string,
// and input used as a value reads everything.
func TestReadsOfModules(t *testing.T) {
	for _, c := range readsCases {
		t.Run(c.name, func(t *testing.T) {
			got := readsOfModules(compileRego(t, c.rego).compiler.Modules)
			if c.want == nil {
				if got != nil {
					t.Fatalf("reads %v, want everything", got.paths("", nil))
				}
				return
			}
			if got == nil {
				t.Fatalf("reads everything, want %v", c.want)
			}
			paths := got.paths("", []string{})
			sort.Strings(paths)
			if strings.Join(paths, " ") != strings.Join(c.want, " ") {
				t.Fatalf("reads %v, want %v", paths, c.want)
			}
		})
	}
}

// project is v with only what reads names, for comparing two inputs on
// what a policy can read of them.
func project(v ast.Value, reads *inputReads) ast.Value {
	obj, ok := v.(ast.Object)
	if reads == nil || reads.whole || !ok {
		return v
	}
	out := ast.NewObject()
	for k, c := range reads.fields {
		if t := obj.Get(ast.StringTerm(k)); t != nil {
			out.Insert(ast.StringTerm(k), ast.NewTerm(project(t.Value, c)))
		}
	}
	return out
}

// badRequests fail to build one way or another.
func badRequests() []*authv3.CheckRequest {
	mk := func(f func(*authv3.CheckRequest)) *authv3.CheckRequest {
		r := proto.Clone(catalogRequest()).(*authv3.CheckRequest)
		f(r)
		return r
	}
	h := func(r *authv3.CheckRequest) *authv3.AttributeContext_HttpRequest { return r.Attributes.Request.Http }
	return []*authv3.CheckRequest{
		mk(func(r *authv3.CheckRequest) { h(r).Headers["x-bad"] = "\xff" }),
		mk(func(r *authv3.CheckRequest) { h(r).Headers["\xfe"] = "v" }),
		mk(func(r *authv3.CheckRequest) { r.Attributes.Source.Service = "a\xc0" }),
		mk(func(r *authv3.CheckRequest) {
			r.Attributes.Request.Time = &timestamppb.Timestamp{Seconds: maxTimestamp + 1}
		}),
		mk(func(r *authv3.CheckRequest) { h(r).Path = "/api/v1/catalog/items?x=%zz" }),
		mk(func(r *authv3.CheckRequest) {
			r.Attributes.MetadataContext = &corev3.Metadata{TypedFilterMetadata: map[string]*anypb.Any{
				"x": {TypeUrl: "type.googleapis.com/no.such.Type", Value: []byte{1}},
			}}
		}),
		mk(func(r *authv3.CheckRequest) {
			h(r).Headers["content-type"] = "application/json"
			h(r).Body = `{"a":1} x`
		}),
		mk(func(r *authv3.CheckRequest) {
			h(r).Headers["content-type"] = "application/json"
			h(r).Headers["content-length"] = "ten"
			h(r).Body = `{}`
		}),
		mk(func(r *authv3.CheckRequest) {
			h(r).Headers["content-type"] = "application/json"
			h(r).Body = `   `
		}),
	}
}

// variedRequests are the catalog request under principals, methods,
// paths and headers the sample policy allows and denies.
func variedRequests() []*authv3.CheckRequest {
	var out []*authv3.CheckRequest
	for _, sp := range []string{"spiffe://cluster.local/ns/frontend/sa/web", "spiffe://cluster.local/ns/checkout/sa/checkout",
		"spiffe://cluster.local/ns/payments/sa/payments", "spiffe://cluster.local/ns/ops/sa/admin", ""} {
		for _, m := range []string{"GET", "POST", "PATCH"} {
			for _, p := range []string{"/api/v1/catalog/items", "/api/v1/orders/1/status?k=x", "/admin/cache", "/healthz"} {
				r := proto.Clone(catalogRequest()).(*authv3.CheckRequest)
				r.Attributes.Source.Principal = sp
				r.Attributes.Request.Http.Method, r.Attributes.Request.Http.Path = m, p
				r.Attributes.Request.Http.Headers["x-tenant"] = m
				r.Attributes.Request.Http.Headers["content-type"] = "application/json"
				r.Attributes.Request.Http.Body = `{"user":"a"}`
				r.Attributes.ContextExtensions = map[string]string{"x": "1"}
				out = append(out, r)
			}
		}
	}
	return out
}

// TestEnvoyInputReads: the input reduced to what a policy reads equals
// the whole input on every path the policy can read, and a request fails
// to build reduced exactly when it fails to build whole, over the example
// requests, random ones and requests that fail each way. Each policy also
// decides every request as it does with the whole input.
func TestEnvoyInputReads(t *testing.T) {
	reqs := append(append(sampleRequests(t), badRequests()...), variedRequests()...)
	r := rand.New(rand.NewPCG(5, 6))
	for i := 0; i < 1000; i++ {
		reqs = append(reqs, randomCheckRequest(r, i%4 == 0))
	}
	ctx := context.Background()
	for _, c := range readsCases {
		t.Run(c.name, func(t *testing.T) {
			cb := compileRego(t, c.rego)
			p, err := cb.provider(ctx, "rego:envoy/authz/allow")
			if err != nil {
				t.Fatal(err)
			}
			failed, decided := 0, map[bool]int{}
			for i, req := range reqs {
				path := strings.SplitN(req.GetAttributes().GetRequest().GetHttp().GetPath(), "?", 2)[0]
				whole, wholeErr := envoyInputValue(req, path)
				got, gotErr := envoyInputReads(req, path, p.reads)
				if (wholeErr != nil) != (gotErr != nil) {
					t.Fatalf("request %d: whole input error %v, reduced input error %v", i, wholeErr, gotErr)
				}
				if wholeErr != nil {
					failed++
					continue
				}
				if project(whole, p.reads).Compare(project(got, p.reads)) != 0 {
					t.Fatalf("request %d: the inputs differ on what the policy reads\nwhole:   %v\nreduced: %v", i, whole, got)
				}
				want, err1 := p.eval(ctx, whole, time.Second)
				res, err2 := p.eval(ctx, got, time.Second)
				if (err1 != nil) != (err2 != nil) || (err1 == nil && want.Allowed != res.Allowed) {
					t.Fatalf("request %d: whole input decides %+v (%v), reduced %+v (%v)", i, want, err1, res, err2)
				}
				if err1 == nil {
					decided[res.Allowed]++
				}
			}
			if failed < len(badRequests()) {
				t.Fatalf("only %d requests failed to build, want at least the %d bad ones", failed, len(badRequests()))
			}
			t.Logf("%d requests, %d failed to build, decided %v", len(reqs), failed, decided)
		})
	}
}

// TestSampleInputIsSmall: for the benchmark's sample policy the reduced
// input holds the three things it reads, not the request.
func TestSampleInputIsSmall(t *testing.T) {
	p := sampleProvider(t)
	v, err := envoyInputReads(catalogRequest(), "/api/v1/catalog/items", p.reads)
	if err != nil {
		t.Fatal(err)
	}
	want := `{"attributes": {"request": {"http": {"method": "GET"}}, "source": {"principal": "spiffe://cluster.local/ns/frontend/sa/web"}}, "parsed_path": ["api", "v1", "catalog", "items"]}`
	if v.String() != want {
		t.Fatalf("input %v\nwant  %s", v, want)
	}
}

// TestWellKnownFieldsOfCheckRequest: requestBuilds knows every field of a
// CheckRequest that holds a well-known type (the only things besides
// UTF-8 that the whole input refuses). A go-control-plane that adds one
// elsewhere fails this test until requestBuilds checks it too.
func TestWellKnownFieldsOfCheckRequest(t *testing.T) {
	var found []string
	var walk func(md protoreflect.MessageDescriptor, path string, seen map[protoreflect.FullName]bool)
	walk = func(md protoreflect.MessageDescriptor, path string, seen map[protoreflect.FullName]bool) {
		if seen[md.FullName()] {
			return
		}
		seen[md.FullName()] = true
		defer delete(seen, md.FullName())
		fields := md.Fields()
		for i := 0; i < fields.Len(); i++ {
			fd := fields.Get(i)
			if fd.IsMap() {
				fd = fd.MapValue()
			}
			m := fd.Message()
			if m == nil {
				continue
			}
			p := path + string(fields.Get(i).Name())
			if m.FullName().Parent() == "google.protobuf" {
				found = append(found, p+": "+string(m.FullName()))
				continue
			}
			walk(m, p+".", seen)
		}
	}
	walk((&authv3.CheckRequest{}).ProtoReflect().Descriptor(), "", map[protoreflect.FullName]bool{})
	sort.Strings(found)
	want := []string{
		"attributes.metadata_context.filter_metadata: google.protobuf.Struct",
		"attributes.metadata_context.typed_filter_metadata: google.protobuf.Any",
		"attributes.request.time: google.protobuf.Timestamp",
		"attributes.route_metadata_context.filter_metadata: google.protobuf.Struct",
		"attributes.route_metadata_context.typed_filter_metadata: google.protobuf.Any",
	}
	if strings.Join(found, "\n") != strings.Join(want, "\n") {
		t.Fatalf("fields of well-known types in CheckRequest:\n%s\nrequestBuilds knows:\n%s", strings.Join(found, "\n"), strings.Join(want, "\n"))
	}
}

// TestStringsValidSeesEveryString: for every string field and every
// string-keyed map of a CheckRequest, found from its descriptor (metadata
// aside, which requestBuilds builds whole), a request holding invalid
// UTF-8 there, and only there, is refused by stringsValid, and the same
// request with valid UTF-8 is not. A field go-control-plane adds that
// stringsValid does not check fails this test.
func TestStringsValidSeesEveryString(t *testing.T) {
	type setter func(m protoreflect.Message, bad bool)
	var cases []string
	var setters []setter
	var walk func(md protoreflect.MessageDescriptor, path string, reach func(protoreflect.Message) protoreflect.Message)
	walk = func(md protoreflect.MessageDescriptor, path string, reach func(protoreflect.Message) protoreflect.Message) {
		fields := md.Fields()
		for i := 0; i < fields.Len(); i++ {
			fd := fields.Get(i)
			p := path + string(fd.Name())
			if p == "attributes.metadata_context" || p == "attributes.route_metadata_context" {
				continue
			}
			str := func(bad bool) string {
				if bad {
					return "a\xffb"
				}
				return "ab"
			}
			switch {
			case fd.IsMap() && fd.MapKey().Kind() == protoreflect.StringKind:
				cases = append(cases, p+" (key)")
				setters = append(setters, func(m protoreflect.Message, bad bool) {
					mm := reach(m).Mutable(fd).Map()
					mm.Set(protoreflect.ValueOfString(str(bad)).MapKey(), protoreflect.ValueOfString("v"))
				})
				if fd.MapValue().Kind() == protoreflect.StringKind {
					cases = append(cases, p+" (value)")
					setters = append(setters, func(m protoreflect.Message, bad bool) {
						mm := reach(m).Mutable(fd).Map()
						mm.Set(protoreflect.ValueOfString("k").MapKey(), protoreflect.ValueOfString(str(bad)))
					})
				}
			case fd.IsList() && fd.Message() != nil:
				walk(fd.Message(), p+"[0].", func(m protoreflect.Message) protoreflect.Message {
					l := reach(m).Mutable(fd).List()
					if l.Len() == 0 {
						l.Append(l.NewElement())
					}
					return l.Get(0).Message()
				})
			case fd.Kind() == protoreflect.StringKind:
				cases = append(cases, p)
				setters = append(setters, func(m protoreflect.Message, bad bool) {
					reach(m).Set(fd, protoreflect.ValueOfString(str(bad)))
				})
			case fd.Message() != nil && fd.Message().FullName().Parent() != "google.protobuf":
				walk(fd.Message(), p+".", func(m protoreflect.Message) protoreflect.Message {
					return reach(m).Mutable(fd).Message()
				})
			}
		}
	}
	walk((&authv3.CheckRequest{}).ProtoReflect().Descriptor(), "", func(m protoreflect.Message) protoreflect.Message { return m })
	if len(cases) < 30 {
		t.Fatalf("found %d strings in a CheckRequest; the walk is broken", len(cases))
	}
	for i, set := range setters {
		for _, bad := range []bool{false, true} {
			req := &authv3.CheckRequest{}
			set(req.ProtoReflect(), bad)
			if got := stringsValid(req); got == bad {
				t.Errorf("%s: invalid UTF-8 %v, stringsValid = %v", cases[i], bad, got)
			}
			if _, err := envoyInputValue(req, "/"); (err != nil) != bad {
				t.Errorf("%s: invalid UTF-8 %v, the whole build's error: %v", cases[i], bad, err)
			}
		}
	}
}

// TestEnvoyInputReadsBodies holds the reduced input to the whole one on
// request bodies that JSON validation and OPA's body parser judge
// differently: a JSON value followed by null is refused by json.Valid and
// taken by OPA's parser as the value alone. A policy that reads no body
// must still see an input for them (security review: an empty input let
// "allow if not deny" allow), and fail exactly when the whole build fails.
func TestEnvoyInputReadsBodies(t *testing.T) {
	const src = `package envoy.authz
default allow := false
deny if input.attributes.source.principal == "spiffe://cluster.local/ns/attacker/sa/x"
allow if not deny`
	p, err := compileRego(t, src).provider(context.Background(), "rego:envoy/authz/allow")
	if err != nil {
		t.Fatal(err)
	}
	bodies := []string{`{} null`, `null`, `[1] null`, `"x" null`, ` null`, `{}null`, "{}\nnull", `{}  `, `{} /*`,
		"\ufeff{}", "{}\x00", `{} {}`, `{} 1`, `{} true`, `{} "a"`, `{}]`, `{} ,`, `nul`, `{"a":1,}`, `1 null null`,
		`null null`, `{} null x`, `{"order":1} null`}
	for _, b := range bodies {
		for _, cl := range []string{"", "-1", "2", "200", "x", " 5", "+9", "0"} {
			h := map[string]string{"content-type": "application/json"}
			if cl != "" {
				h["content-length"] = cl
			}
			req := &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
				Source:  &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/attacker/sa/x"},
				Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Path: "/", Headers: h, Body: b}},
			}}
			_, werr := envoyInputValue(req, "/")
			r, rerr := envoyInputReads(req, "/", p.reads)
			if (werr == nil) != (rerr == nil) || (rerr == nil && r == nil) {
				t.Errorf("body %q, content-length %q: whole input error %v; reduced input %v, error %v", b, cl, werr, r, rerr)
			}
			if werr != nil {
				continue
			}
			res, err := p.evalRequest(context.Background(), req, "/", time.Second)
			if err != nil {
				t.Errorf("body %q, content-length %q: %v", b, cl, err)
				continue
			}
			if res.Allowed {
				t.Errorf("body %q, content-length %q: the attacker is allowed", b, cl)
			}
		}
	}
}
