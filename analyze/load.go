package analyze

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
)

// CodeInvalid is the code of an object the engine refuses.
const CodeInvalid = "TMA000"

// Policies accumulates the AuthorizationPolicies of several files and
// directories, and a TMA000 finding for every object the engine's parser
// refuses. It keeps going past a refused file or document, so that every
// problem is reported at once.
type Policies struct {
	// DefaultNamespace is given to policies that name none, as the
	// engine's Dir source does.
	DefaultNamespace string

	policies []*policy.Policy
	findings []Finding
	seen     map[string]string // key -> origin
}

// Policies returns the accepted policies.
func (ps *Policies) Policies() []*policy.Policy { return ps.policies }

// Findings returns a TMA000 finding for every refused object.
func (ps *Policies) Findings() []Finding { return ps.findings }

// AddPath loads a file, or every policy file directly in a directory (as
// the engine's Dir source reads it: source.PolicyFiles). An error, the
// *fs.PathError, is returned only when the path cannot be read at all;
// refused objects become findings.
func (ps *Policies) AddPath(path string) error {
	st, err := os.Stat(path)
	if err != nil {
		return err
	}
	if !st.IsDir() {
		data, err := os.ReadFile(path)
		if err != nil {
			return err
		}
		ps.AddFile(path, data)
		return nil
	}
	files, err := source.PolicyFiles(path)
	if err != nil {
		return err
	}
	for _, p := range files {
		data, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		ps.AddFile(p, data)
	}
	return nil
}

// AddFile reads the YAML documents of one file as the engine's Dir source
// does, with source.ParseFile (the engine's parser, then its check of each
// policy, engine.CheckPolicy). A document it refuses becomes a TMA000
// finding whose message is the refusal, verbatim; the file's other
// documents still load. Each document is parsed from the whole file with every other
// document blanked out, so that the refusal names the same document and
// line as a parse of the whole file does.
func (ps *Policies) AddFile(origin string, data []byte) {
	all, err := source.ParseFile(origin, data, ps.DefaultNamespace)
	if err == nil {
		ps.add(all)
		return
	}
	docs, splitErr := splitDocuments(data)
	if splitErr != nil || len(docs) == 0 {
		// The reader itself failed: the whole file is refused.
		ps.refuse(origin, "", err)
		return
	}
	for _, d := range docs {
		got, err := source.ParseFile(origin, d.only(data), ps.DefaultNamespace)
		if err != nil {
			ps.refuse(origin, d.object(ps.DefaultNamespace), err)
			continue
		}
		ps.add(got)
	}
}

// AddPolicy adds one policy converted and checked elsewhere (a Kubernetes
// object, by kube.ConvertV1, which makes source.ParseFile's check).
func (ps *Policies) AddPolicy(p *policy.Policy) { ps.add([]*policy.Policy{p}) }

// Refuse records an object the engine refused, with the refusal verbatim.
func (ps *Policies) Refuse(origin, object string, err error) { ps.refuse(origin, object, err) }

func (ps *Policies) add(got []*policy.Policy) {
	if ps.seen == nil {
		ps.seen = map[string]string{}
	}
	for _, p := range got {
		if prev, dup := ps.seen[p.Key()]; dup {
			// As source.ParseDir refuses the same.
			ps.refuse(p.Origin, "AuthorizationPolicy "+p.Key(), source.DuplicateError(p, prev))
			continue
		}
		ps.seen[p.Key()] = p.Origin
		ps.policies = append(ps.policies, p)
	}
}

func (ps *Policies) refuse(origin, object string, err error) {
	f := Finding{Code: CodeInvalid, Severity: SeverityError, Object: object, Origin: origin, Message: err.Error()}
	var fe *policy.FieldError
	if errors.As(err, &fe) {
		f.Field = fe.Field
		if f.Object == "" && fe.Policy != "" {
			f.Object = "AuthorizationPolicy " + fe.Policy
		}
		if fe.Line > 0 {
			f.Origin = fmt.Sprintf("%s:%d", fe.Origin, fe.Line)
		} else {
			f.Origin = fe.Origin
		}
	}
	if f.Object == "" {
		f.Object = origin
	}
	ps.findings = append(ps.findings, f)
}

// document is one YAML document of a file: lines [start, end) of it, as
// k8s.io/apimachinery's YAMLReader (which policy.ParseYAML reads with)
// splits them at "---" lines.
type document struct {
	start, end int
	raw        []byte
}

// splitDocuments splits data into its non-empty documents.
func splitDocuments(data []byte) ([]document, error) {
	lines := bytes.SplitAfter(data, []byte("\n"))
	var (
		out   []document
		start int
	)
	flush := func(end int) {
		raw := bytes.Join(lines[start:end], nil)
		if len(bytes.TrimSpace(raw)) > 0 {
			out = append(out, document{start: start, end: end, raw: raw})
		}
	}
	for i, l := range lines {
		if rest, ok := bytes.CutPrefix(l, []byte("---")); ok {
			t := bytes.TrimSpace(rest)
			if len(t) > 0 && t[0] != '#' {
				return nil, errors.New("invalid document separator")
			}
			flush(i)
			start = i + 1
		}
	}
	flush(len(lines))
	return out, nil
}

// only returns data with every line outside the document blanked: the same
// documents and lines, all empty but this one.
func (d document) only(data []byte) []byte {
	lines := bytes.SplitAfter(data, []byte("\n"))
	var b bytes.Buffer
	for i, l := range lines {
		switch {
		case i >= d.start && i < d.end:
			b.Write(l)
		case bytes.HasPrefix(l, []byte("---")):
			b.WriteString("---\n")
		case bytes.HasSuffix(l, []byte("\n")):
			b.WriteString("#\n")
		}
	}
	return b.Bytes()
}

// object names the document's object ("AuthorizationPolicy ns/name"), read
// leniently; "" when it has no name.
func (d document) object(defaultNamespace string) string {
	var env struct {
		Kind     string `json:"kind"`
		Metadata struct {
			Name      string `json:"name"`
			Namespace string `json:"namespace"`
		} `json:"metadata"`
	}
	_ = yaml.Unmarshal(d.raw, &env)
	if env.Metadata.Name == "" {
		return ""
	}
	ns := env.Metadata.Namespace
	if ns == "" {
		ns = defaultNamespace
	}
	kind := env.Kind
	if kind == "" {
		kind = "AuthorizationPolicy"
	}
	kind = strings.TrimSpace(kind)
	return kind + " " + ns + "/" + env.Metadata.Name
}
