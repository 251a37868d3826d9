package policy

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	yaml "go.yaml.in/yaml/v3"
	"google.golang.org/protobuf/reflect/protoreflect"
	securityv1beta1 "istio.io/api/security/v1beta1"
)

// A located document knows, for one YAML document, the line of every field
// (by the path FieldError.Field uses) and every mapping key that is not a
// field of the object at its place, so that refusals name the line of the
// file and the field the author probably meant.
type located struct {
	lines   map[string]int
	unknown []unknownField
}

type unknownField struct {
	field   string // path of the unknown key
	key     string
	line    int
	nearest string // the known field nearest to key, or ""
}

func (u unknownField) message() string {
	if u.nearest != "" {
		return fmt.Sprintf("unknown field %q; did you mean %q?", u.key, u.nearest)
	}
	return fmt.Sprintf("unknown field %q", u.key)
}

// shape is what a YAML mapping may hold at one place: the fields of an
// envelope (fields) or of a protobuf message (msg); neither means any key
// (a map such as matchLabels, or a value the decoders check).
type shape struct {
	fields map[string]*shape
	msg    protoreflect.MessageDescriptor
}

var (
	anyKeys = &shape{}
	// documentShape is the envelope parseDocument decodes strictly.
	documentShape = &shape{fields: map[string]*shape{
		"apiVersion": anyKeys,
		"kind":       anyKeys,
		"metadata": {fields: map[string]*shape{
			"name": anyKeys, "namespace": anyKeys, "annotations": anyKeys, "labels": anyKeys,
		}},
		"spec":   {msg: (&securityv1beta1.AuthorizationPolicy{}).ProtoReflect().Descriptor()},
		"status": anyKeys,
	}}
)

// child is the shape of key's value, and whether key is a field here.
// A protobuf field may be spelt as in JSON or as in the .proto file, as
// protojson accepts both.
func (s *shape) child(key string) (*shape, bool) {
	switch {
	case s.fields != nil:
		c, ok := s.fields[key]
		return c, ok
	case s.msg != nil:
		fds := s.msg.Fields()
		fd := fds.ByJSONName(key)
		if fd == nil {
			fd = fds.ByTextName(key)
		}
		if fd == nil {
			return nil, false
		}
		if fd.Kind() == protoreflect.MessageKind && !fd.IsMap() && !strings.HasPrefix(string(fd.Message().FullName()), "google.protobuf.") {
			return &shape{msg: fd.Message()}, true
		}
		return anyKeys, true
	}
	return anyKeys, true
}

// names are the field names allowed here, as an author writes them.
func (s *shape) names() []string {
	var out []string
	for k := range s.fields {
		out = append(out, k)
	}
	if s.msg != nil {
		fds := s.msg.Fields()
		for i := 0; i < fds.Len(); i++ {
			out = append(out, fds.Get(i).JSONName())
		}
	}
	sort.Strings(out)
	return out
}

// locate reads raw, a document whose first line is line first of its file.
// A document yaml.v3 cannot read locates nothing: the strict decoders still
// refuse what is wrong, without lines.
func locate(raw []byte, first int) *located {
	l := &located{lines: map[string]int{}}
	var root yaml.Node
	if err := yaml.Unmarshal(raw, &root); err != nil {
		return l
	}
	l.walk(&root, documentShape, "", first-1, 0)
	return l
}

// maxDepth bounds the walk, which follows aliases.
const maxDepth = 64

func (l *located) walk(n *yaml.Node, s *shape, path string, offset, depth int) {
	if n == nil || depth > maxDepth {
		return
	}
	if path != "" {
		if _, seen := l.lines[path]; !seen {
			l.lines[path] = n.Line + offset
		}
	}
	switch n.Kind {
	case yaml.DocumentNode:
		for _, c := range n.Content {
			l.walk(c, s, path, offset, depth+1)
		}
	case yaml.AliasNode:
		l.walk(n.Alias, s, path, offset, depth+1)
	case yaml.SequenceNode:
		for i, c := range n.Content {
			l.walk(c, s, fmt.Sprintf("%s[%d]", path, i), offset, depth+1)
		}
	case yaml.MappingNode:
		for i := 0; i+1 < len(n.Content); i += 2 {
			k, v := n.Content[i], n.Content[i+1]
			if k.Tag == "!!merge" {
				l.walk(v, s, path, offset, depth+1)
				continue
			}
			if s == anyKeys {
				// A map: its keys are data, named as FromSpec names them.
				l.walk(v, anyKeys, fmt.Sprintf("%s[%s]", path, k.Value), offset, depth+1)
				continue
			}
			at := k.Value
			if path != "" {
				at = path + "." + k.Value
			}
			c, ok := s.child(k.Value)
			if !ok {
				l.unknown = append(l.unknown, unknownField{field: at, key: k.Value, line: k.Line + offset, nearest: nearest(k.Value, s.names())})
				continue
			}
			l.lines[at] = k.Line + offset
			l.walk(v, c, at, offset, depth+1)
		}
	}
}

// line is the line of field, or of the nearest enclosing field located.
func (l *located) line(field string) int {
	for field != "" {
		if n, ok := l.lines[field]; ok {
			return n
		}
		i := strings.LastIndexAny(field, ".[")
		if i < 0 {
			break
		}
		field = field[:i]
	}
	return 0
}

// setLines sets the line of every *FieldError in err.
func (l *located) setLines(err error) {
	var fe *FieldError
	if errors.As(err, &fe) && fe.Line == 0 {
		fe.Line = l.line(fe.Field)
	}
	if j, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range j.Unwrap() {
			l.setLines(e)
		}
	}
}

// nearest is the name closest to key by edit distance, ignoring case, if it
// is close enough to be what the author meant: a typo, a missing or extra
// letter, two letters swapped.
func nearest(key string, names []string) string {
	best, bestD := "", max(1, len(key)/3)+1
	for _, n := range names {
		if d := editDistance(strings.ToLower(key), strings.ToLower(n)); d < bestD {
			best, bestD = n, d
		}
	}
	return best
}

// editDistance is the optimal string alignment distance: insertions,
// deletions, substitutions and transpositions of adjacent bytes.
func editDistance(a, b string) int {
	d := make([][]int, len(a)+1)
	for i := range d {
		d[i] = make([]int, len(b)+1)
		d[i][0] = i
	}
	for j := range d[0] {
		d[0][j] = j
	}
	for i := 1; i <= len(a); i++ {
		for j := 1; j <= len(b); j++ {
			cost := 1
			if a[i-1] == b[j-1] {
				cost = 0
			}
			d[i][j] = min(d[i-1][j]+1, d[i][j-1]+1, d[i-1][j-1]+cost)
			if i > 1 && j > 1 && a[i-1] == b[j-2] && a[i-2] == b[j-1] {
				d[i][j] = min(d[i][j], d[i-2][j-2]+1)
			}
		}
	}
	return d[len(a)][len(b)]
}
