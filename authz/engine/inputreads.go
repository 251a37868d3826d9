package engine

import (
	"encoding/json"
	"strconv"
	"strings"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// inputReads is the part of input a set of compiled modules can read: a
// tree of field names under which whole marks a subtree read in full. The
// zero value reads nothing; a nil *inputReads reads everything. It is
// found once per bundle revision (readsOfModules) and never changed.
type inputReads struct {
	whole  bool
	fields map[string]*inputReads
}

// readsOfModules is what the compiled modules' rules read of input: every
// reference rooted at input, up to its first element that is not a
// constant string (input.parsed_path[4] reads parsed_path, input.x[k]
// reads x). input itself, as a value (x := input, f(input), walk(input,
// ...)), reads everything, and then readsOfModules returns nil. Imports are
// skipped: the compiler has resolved every use of an imported name into a
// full reference, which is read where it is used.
func readsOfModules(modules map[string]*ast.Module) *inputReads {
	reads := &inputReads{}
	var vis *ast.GenericVisitor
	vis = ast.NewGenericVisitor(func(x any) bool {
		switch v := x.(type) {
		case ast.Ref:
			if !v.HasPrefix(ast.InputRootRef) {
				return false
			}
			reads.add(v[1:])
			for _, t := range v[1:] {
				vis.Walk(t)
			}
			return true
		case ast.Var:
			if v.Equal(ast.InputRootDocument.Value) {
				reads.whole = true
			}
		}
		return false
	})
	for _, m := range modules {
		for _, r := range m.Rules {
			vis.Walk(r)
		}
	}
	if reads.whole {
		return nil
	}
	return reads
}

// add marks the reference path (after input) as read: its constant string
// prefix, whole below it.
func (n *inputReads) add(path ast.Ref) {
	for _, t := range path {
		if n.whole {
			return
		}
		s, ok := t.Value.(ast.String)
		if !ok {
			break
		}
		if n.fields == nil {
			n.fields = map[string]*inputReads{}
		}
		c, ok := n.fields[string(s)]
		if !ok {
			c = &inputReads{}
			n.fields[string(s)] = c
		}
		n = c
	}
	n.whole, n.fields = true, nil
}

// child is what is read of the field name below n: nil for everything.
func (n *inputReads) child(name string) (*inputReads, bool) {
	if n == nil || n.whole {
		return nil, true
	}
	c, ok := n.fields[name]
	if ok && c.whole {
		return nil, true
	}
	return c, ok
}

// envoyInputReads is envoyInputValue reduced to what reads names: the same
// document, less the fields no rule can read. A request whose whole input
// does not build (invalid UTF-8, a Timestamp or well-known type protojson
// refuses, a malformed query, JSON body or content-length) fails as
// envoyInputValue fails, whether or not its rules would read the bad part:
// building less never lets through what building all refused.
func envoyInputReads(req *authv3.CheckRequest, normalizedPath string, reads *inputReads) (ast.Value, error) {
	if reads == nil || !requestBuilds(req) {
		return envoyInputValue(req, normalizedPath)
	}
	root := ast.NewObject()
	if sub, ok := reads.child("attributes"); ok {
		if a := req.GetAttributes(); a != nil {
			obj, err := messageReads(a.ProtoReflect(), sub)
			if err != nil {
				return nil, err
			}
			root.Insert(ast.InternedTerm("attributes"), ast.NewTerm(obj))
		}
	}
	if _, ok := reads.child("version"); ok {
		root.Insert(ast.InternedTerm("version"), ast.NewTerm(versionValue))
	}
	if _, ok := reads.child("parsed_path"); ok {
		root.Insert(ast.InternedTerm("parsed_path"), pathTerm(normalizedPath))
	}
	h := req.GetAttributes().GetRequest().GetHttp()
	vals, err := queryValues(h.GetPath())
	if err != nil {
		return nil, err
	}
	if _, ok := reads.child("parsed_query"); ok {
		root.Insert(ast.InternedTerm("parsed_query"), queryTerm(vals))
	}
	_, body := reads.child("parsed_body")
	_, truncated := reads.child("truncated_body")
	if !body && !truncated {
		if !bodyParses(h) {
			// The quick check and OPA's body parser disagree on some
			// bodies (a JSON value followed by null passes OPA's, not
			// json.Valid): the whole build decides, so that no input is
			// ever missing without an error.
			return envoyInputValue(req, normalizedPath)
		}
		return root, nil
	}
	b, trunc, err := parsedBody(h)
	if err != nil {
		return nil, err
	}
	if body {
		bodyValue := ast.Value(ast.Null{})
		if b != nil {
			if bodyValue, err = ast.InterfaceToValue(b); err != nil {
				return nil, err
			}
		}
		root.Insert(ast.InternedTerm("parsed_body"), ast.NewTerm(bodyValue))
	}
	if truncated {
		root.Insert(ast.InternedTerm("truncated_body"), ast.InternedTerm(trunc))
	}
	return root, nil
}

// messageReads is messageValue of the fields reads names, each in full
// but for messages and maps, which are reduced in turn.
func messageReads(m protoreflect.Message, reads *inputReads) (ast.Object, error) {
	if reads == nil {
		return messageValue(m)
	}
	obj := ast.NewObject()
	fields := m.Descriptor().Fields()
	for name, sub := range reads.fields {
		fd := fields.ByJSONName(name)
		if fd == nil || !m.Has(fd) {
			continue
		}
		if sub.whole {
			sub = nil
		}
		v := m.Get(fd)
		var t *ast.Term
		var err error
		switch {
		case sub != nil && fd.IsMap():
			t, err = mapReads(fd, v.Map(), sub)
		case sub != nil && !fd.IsList() && fd.Kind() == protoreflect.MessageKind &&
			fd.Message().FullName().Parent() != "google.protobuf":
			var o ast.Object
			if o, err = messageReads(v.Message(), sub); err == nil {
				t = ast.NewTerm(o)
			}
		default:
			t, err = fieldTerm(fd, v)
		}
		if err != nil {
			return nil, err
		}
		obj.Insert(jsonNameTerm(fd), t)
	}
	return obj, nil
}

// mapReads is mapTerm of the keys reads names.
func mapReads(fd protoreflect.FieldDescriptor, m protoreflect.Map, reads *inputReads) (*ast.Term, error) {
	obj := ast.NewObject()
	if fd.MapKey().Kind() != protoreflect.StringKind {
		return mapTerm(fd, m)
	}
	for key := range reads.fields {
		v := m.Get(protoreflect.ValueOfString(key).MapKey())
		if !v.IsValid() {
			continue
		}
		t, err := singularTerm(fd.MapValue(), v)
		if err != nil {
			return nil, err
		}
		obj.Insert(ast.StringTerm(key), t)
	}
	return ast.NewTerm(obj), nil
}

// requestBuilds reports whether messageValue is known to build req's
// whole message without an error, so that building part of it cannot let
// through a request building all of it refuses. When it answers false,
// envoyInputReads builds everything, which refuses what it refuses.
// messageValue fails on exactly three things:
//   - invalid UTF-8 in a string or map key: stringsValid checks every
//     string of a CheckRequest through the generated getters, without
//     reflection (TestStringsValidSeesEveryString);
//   - a Timestamp outside protojson's range: the one Timestamp of a
//     CheckRequest, attributes.request.time, is checked;
//   - another well-known type protojson refuses: metadata_context and
//     route_metadata_context (Struct and Any) are the only ones; a request
//     that carries either is built whole.
//
// TestWellKnownFieldsOfCheckRequest fails when go-control-plane adds a
// field of a well-known type elsewhere.
func requestBuilds(req *authv3.CheckRequest) bool {
	a := req.GetAttributes()
	if a.GetMetadataContext() != nil || a.GetRouteMetadataContext() != nil {
		return false
	}
	if t := a.GetRequest().GetTime(); t != nil && !timestampInRange(t.GetSeconds(), t.GetNanos()) {
		return false
	}
	return stringsValid(req)
}

// stringsValid reports whether every string and map key of req is valid
// UTF-8 (those of metadata aside, which requestBuilds leaves to the whole
// build).
func stringsValid(req *authv3.CheckRequest) bool {
	a := req.GetAttributes()
	h := a.GetRequest().GetHttp()
	if !peerValid(a.GetSource()) || !peerValid(a.GetDestination()) ||
		!mapValid(a.GetContextExtensions()) || !utf8.ValidString(a.GetTlsSession().GetSni()) ||
		!mapValid(h.GetHeaders()) {
		return false
	}
	for _, hv := range h.GetHeaderMap().GetHeaders() {
		if !utf8.ValidString(hv.GetKey()) || !utf8.ValidString(hv.GetValue()) {
			return false
		}
	}
	for _, s := range [...]string{h.GetId(), h.GetMethod(), h.GetPath(), h.GetHost(), h.GetScheme(),
		h.GetQuery(), h.GetFragment(), h.GetProtocol(), h.GetBody()} {
		if !utf8.ValidString(s) {
			return false
		}
	}
	return true
}

func peerValid(p *authv3.AttributeContext_Peer) bool {
	ad := p.GetAddress()
	sa, ia := ad.GetSocketAddress(), ad.GetEnvoyInternalAddress()
	for _, s := range [...]string{sa.GetAddress(), sa.GetNamedPort(), sa.GetResolverName(), sa.GetNetworkNamespaceFilepath(),
		ad.GetPipe().GetPath(), ia.GetServerListenerName(), ia.GetEndpointId(),
		p.GetService(), p.GetPrincipal(), p.GetCertificate()} {
		if !utf8.ValidString(s) {
			return false
		}
	}
	return mapValid(p.GetLabels())
}

func mapValid(m map[string]string) bool {
	for k, v := range m {
		if !utf8.ValidString(k) || !utf8.ValidString(v) {
			return false
		}
	}
	return true
}

// bodyParses reports whether parsedBody succeeds on h, without building
// the body: the content-length parses and the body is valid JSON, where
// parsedBody looks at them.
func bodyParses(h *authv3.AttributeContext_HttpRequest) bool {
	if !strings.Contains(h.GetHeaders()["content-type"], "application/json") || h.GetBody() == "" {
		return true
	}
	if cl, ok := h.GetHeaders()["content-length"]; ok {
		n, err := strconv.ParseInt(cl, 10, 64)
		if err != nil {
			return false
		}
		if n != -1 && n > int64(len(h.GetBody())) {
			return true
		}
	}
	return json.Valid([]byte(h.GetBody()))
}
