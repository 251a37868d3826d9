package engine

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/util"
	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/reflect/protoreflect"
)

// envoyInputValue builds the same document as EnvoyInput, as a Rego value,
// straight from the proto: no protojson text, no map[string]any and no
// ast.InterfaceToValue on the way. It walks the message by reflection
// under protojson's rules (JSON field names, populated fields only, 64-bit
// integers and Timestamps as strings, bytes in base64, enums by name) and
// hands the well-known types it does not spell out itself (Struct, Any,
// wrappers: metadata, rarely present) to protojson, so they read as they
// always did. TestEnvoyInputValue holds the two builders equal.
func envoyInputValue(req *authv3.CheckRequest, normalizedPath string) (ast.Value, error) {
	root, err := messageValue(req.ProtoReflect())
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	root.Insert(ast.InternedTerm("version"), ast.NewTerm(versionValue))
	h := req.GetAttributes().GetRequest().GetHttp()

	root.Insert(ast.InternedTerm("parsed_path"), pathTerm(normalizedPath))

	vals, err := queryValues(h.GetPath())
	if err != nil {
		return nil, err
	}
	root.Insert(ast.InternedTerm("parsed_query"), queryTerm(vals))

	body, truncated, err := parsedBody(h)
	if err != nil {
		return nil, err
	}
	bodyValue := ast.Value(ast.Null{})
	if body != nil {
		if bodyValue, err = ast.InterfaceToValue(body); err != nil {
			return nil, fmt.Errorf("engine: parsed body: %w", err)
		}
	}
	root.Insert(ast.InternedTerm("parsed_body"), ast.NewTerm(bodyValue))
	root.Insert(ast.InternedTerm("truncated_body"), ast.InternedTerm(truncated))
	return root, nil
}

// pathTerm is input.parsed_path as a Rego array.
func pathTerm(normalizedPath string) *ast.Term {
	segs := pathSegments(normalizedPath)
	ts := make([]*ast.Term, len(segs))
	for i, seg := range segs {
		ts[i] = ast.StringTerm(seg)
	}
	return ast.ArrayTerm(ts...)
}

// queryTerm is input.parsed_query as a Rego object.
func queryTerm(vals url.Values) *ast.Term {
	query := ast.NewObject()
	for k, vs := range vals {
		a := make([]*ast.Term, len(vs))
		for i, v := range vs {
			a[i] = ast.StringTerm(v)
		}
		query.Insert(ast.StringTerm(k), ast.ArrayTerm(a...))
	}
	return ast.NewTerm(query)
}

// pathSegments is input.parsed_path: the normalized path split at "/",
// each segment unescaped where it unescapes.
func pathSegments(normalizedPath string) []string {
	p := normalizedPath
	if p == "" {
		p = "/"
	}
	segs := strings.Split(strings.TrimLeft(p, "/"), "/")
	for i, s := range segs {
		if u, err := url.PathUnescape(s); err == nil {
			segs[i] = u
		}
	}
	return segs
}

// queryValues is input.parsed_query: the query of the request's raw path,
// without its fragment.
func queryValues(rawPath string) (url.Values, error) {
	_, q, ok := strings.Cut(rawPath, "?")
	if !ok {
		return nil, nil
	}
	if i := strings.IndexByte(q, '#'); i >= 0 {
		q = q[:i]
	}
	vals, err := url.ParseQuery(q)
	if err != nil {
		return nil, fmt.Errorf("engine: parsing query: %w", err)
	}
	return vals, nil
}

// versionValue is input.version, the same in every input. Rego values are
// not modified by evaluation, so one is shared.
var versionValue = ast.NewObject(
	[2]*ast.Term{ast.StringTerm("ext_authz"), ast.StringTerm("v3")},
	[2]*ast.Term{ast.StringTerm("encoding"), ast.StringTerm("protojson")},
)

// messageValue is m as protojson writes it, as a Rego object.
func messageValue(m protoreflect.Message) (ast.Object, error) {
	obj := ast.NewObject()
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		var t *ast.Term
		if t, err = fieldTerm(fd, v); err != nil {
			err = fmt.Errorf("%s: %w", fd.JSONName(), err)
			return false
		}
		obj.Insert(jsonNameTerm(fd), t)
		return true
	})
	if err != nil {
		return nil, err
	}
	return obj, nil
}

// fieldTerm is the value v of field fd, as protojson writes it.
func fieldTerm(fd protoreflect.FieldDescriptor, v protoreflect.Value) (*ast.Term, error) {
	switch {
	case fd.IsMap():
		return mapTerm(fd, v.Map())
	case fd.IsList():
		return listTerm(fd, v.List())
	}
	return singularTerm(fd, v)
}

// fieldNames holds the JSON name of every field of a CheckRequest, and of
// the messages in it, as a Rego term: built once, never changed, so the
// walk does not allocate a key per field.
var fieldNames = func() map[protoreflect.FullName]*ast.Term {
	names := map[protoreflect.FullName]*ast.Term{}
	var walk func(md protoreflect.MessageDescriptor)
	walk = func(md protoreflect.MessageDescriptor) {
		fields := md.Fields()
		for i := 0; i < fields.Len(); i++ {
			fd := fields.Get(i)
			if _, ok := names[fd.FullName()]; ok {
				continue
			}
			names[fd.FullName()] = ast.StringTerm(fd.JSONName())
			if fd.IsMap() {
				fd = fd.MapValue()
			}
			if m := fd.Message(); m != nil {
				walk(m)
			}
		}
	}
	walk((&authv3.CheckRequest{}).ProtoReflect().Descriptor())
	return names
}()

func jsonNameTerm(fd protoreflect.FieldDescriptor) *ast.Term {
	if t, ok := fieldNames[fd.FullName()]; ok {
		return t
	}
	return ast.StringTerm(fd.JSONName())
}

func mapTerm(fd protoreflect.FieldDescriptor, m protoreflect.Map) (*ast.Term, error) {
	obj := ast.NewObject()
	var err error
	m.Range(func(k protoreflect.MapKey, v protoreflect.Value) bool {
		key := k.String()
		if !utf8.ValidString(key) {
			err = errInvalidUTF8
			return false
		}
		var t *ast.Term
		if t, err = singularTerm(fd.MapValue(), v); err != nil {
			return false
		}
		obj.Insert(ast.StringTerm(key), t)
		return true
	})
	if err != nil {
		return nil, err
	}
	return ast.NewTerm(obj), nil
}

func listTerm(fd protoreflect.FieldDescriptor, l protoreflect.List) (*ast.Term, error) {
	ts := make([]*ast.Term, l.Len())
	for i := range ts {
		t, err := singularTerm(fd, l.Get(i))
		if err != nil {
			return nil, err
		}
		ts[i] = t
	}
	return ast.ArrayTerm(ts...), nil
}

var errInvalidUTF8 = fmt.Errorf("string field contains invalid UTF-8")

// singularTerm is one value of field fd, as protojson writes it.
func singularTerm(fd protoreflect.FieldDescriptor, v protoreflect.Value) (*ast.Term, error) {
	switch fd.Kind() {
	case protoreflect.BoolKind:
		return ast.InternedTerm(v.Bool()), nil
	case protoreflect.StringKind:
		s := v.String()
		if !utf8.ValidString(s) {
			return nil, errInvalidUTF8
		}
		return ast.StringTerm(s), nil
	case protoreflect.BytesKind:
		return ast.StringTerm(base64.StdEncoding.EncodeToString(v.Bytes())), nil
	case protoreflect.Int32Kind, protoreflect.Sint32Kind, protoreflect.Sfixed32Kind:
		return ast.NumberTerm(json.Number(strconv.FormatInt(v.Int(), 10))), nil
	case protoreflect.Uint32Kind, protoreflect.Fixed32Kind:
		return ast.NumberTerm(json.Number(strconv.FormatUint(v.Uint(), 10))), nil
	case protoreflect.FloatKind, protoreflect.DoubleKind:
		return floatTerm(v.Float(), fd.Kind() == protoreflect.FloatKind), nil
	case protoreflect.Int64Kind, protoreflect.Sint64Kind, protoreflect.Sfixed64Kind:
		return ast.StringTerm(strconv.FormatInt(v.Int(), 10)), nil
	case protoreflect.Uint64Kind, protoreflect.Fixed64Kind:
		return ast.StringTerm(strconv.FormatUint(v.Uint(), 10)), nil
	case protoreflect.EnumKind:
		if ev := fd.Enum().Values().ByNumber(v.Enum()); ev != nil && fd.Enum().FullName() != "google.protobuf.NullValue" {
			return ast.StringTerm(string(ev.Name())), nil
		}
	case protoreflect.MessageKind, protoreflect.GroupKind:
		m := v.Message()
		switch m.Descriptor().FullName() {
		case "google.protobuf.Timestamp":
			if t, ok := timestampTerm(m); ok {
				return t, nil
			}
		default:
			if m.Descriptor().FullName().Parent() != "google.protobuf" {
				obj, err := messageValue(m)
				if err != nil {
					return nil, err
				}
				return ast.NewTerm(obj), nil
			}
		}
		return protojsonTerm(m)
	}
	// An enum number the descriptor does not name, or NullValue.
	if fd.Enum().FullName() == "google.protobuf.NullValue" {
		return ast.NullTerm(), nil
	}
	return ast.NumberTerm(json.Number(strconv.FormatInt(int64(v.Enum()), 10))), nil
}

// floatTerm is a float or double field: a JSON number, or the strings
// protojson writes for the values JSON has no number for.
func floatTerm(f float64, single bool) *ast.Term {
	switch {
	case math.IsNaN(f):
		return ast.StringTerm("NaN")
	case math.IsInf(f, 1):
		return ast.StringTerm("Infinity")
	case math.IsInf(f, -1):
		return ast.StringTerm("-Infinity")
	}
	bits := 64
	if single {
		bits = 32
	}
	return ast.NumberTerm(json.Number(strconv.FormatFloat(f, 'g', -1, bits)))
}

// Timestamps protojson can write: years 0001 to 9999.
const (
	minTimestamp = -62135596800
	maxTimestamp = 253402300799
)

// timestampInRange reports whether protojson writes the Timestamp.
func timestampInRange(secs int64, nanos int32) bool {
	return secs >= minTimestamp && secs <= maxTimestamp && nanos >= 0 && nanos < 1e9
}

// timestampTerm writes a google.protobuf.Timestamp as protojson does: RFC
// 3339 in UTC with 0, 3, 6 or 9 digits of fraction. Out of range, it
// answers false and protojson gives the error it always gave.
func timestampTerm(m protoreflect.Message) (*ast.Term, bool) {
	fields := m.Descriptor().Fields()
	secs := m.Get(fields.ByNumber(1)).Int()
	nanos := m.Get(fields.ByNumber(2)).Int()
	if !timestampInRange(secs, int32(nanos)) {
		return nil, false
	}
	s := time.Unix(secs, nanos).UTC().Format("2006-01-02T15:04:05")
	if nanos != 0 {
		frac := fmt.Sprintf("%09d", nanos)
		for len(frac) > 3 && strings.HasSuffix(frac, "000") {
			frac = frac[:len(frac)-3]
		}
		s += "." + frac
	}
	return ast.StringTerm(s + "Z"), true
}

// protojsonTerm is a well-known type the walk leaves to protojson (Struct,
// Value, Any, Duration, wrappers ...), read back as EnvoyInput reads it.
func protojsonTerm(m protoreflect.Message) (*ast.Term, error) {
	bs, err := protojson.Marshal(m.Interface())
	if err != nil {
		return nil, err
	}
	var x any
	if err := util.UnmarshalJSON(bs, &x); err != nil {
		return nil, err
	}
	v, err := ast.InterfaceToValue(x)
	if err != nil {
		return nil, err
	}
	return ast.NewTerm(v), nil
}
