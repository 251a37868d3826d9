package analyze

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sort"
	"strings"

	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/mesh/meshcheck"
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
	skipped  map[string]int    // kind -> documents
	// meshObjects counts the mesh objects AddFile checked.
	meshObjects int
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
//
// Documents of other kinds do not reach the policy reader: a mesh kind
// trustmesh reads (meshcheck.Kinds: PeerAuthentication, ServiceEntry,
// Gateway, VirtualService) is checked by the mesh's own check, as the
// admission webhook checks it, and each refusal is a TMA030 or TMA031
// finding; any other kind (a Deployment, a Service, a ConfigMap) is
// skipped and counted (Skipped), so that a directory of mixed manifests
// can be analyzed. A document without a kind still goes to the policy
// reader, which refuses it.
func (ps *Policies) AddFile(origin string, data []byte) {
	data = ps.otherKinds(origin, data)
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

// Skipped returns how many documents of each kind AddFile skipped.
func (ps *Policies) Skipped() map[string]int { return ps.skipped }

// SkippedNote says how many documents AddFile skipped, and of which kinds;
// "" when none.
func (ps *Policies) SkippedNote() string {
	if len(ps.skipped) == 0 {
		return ""
	}
	n := 0
	var kinds []string
	for k, c := range ps.skipped {
		n += c
		kinds = append(kinds, fmt.Sprintf("%s (%d)", k, c))
	}
	sort.Strings(kinds)
	return fmt.Sprintf("skipped %d document(s) of kinds trustmesh does not read from -f: %s", n, strings.Join(kinds, ", "))
}

// otherKinds checks the documents of data that are not
// AuthorizationPolicies, and returns data with them blanked, so that the
// policy reader sees the same documents and lines but theirs empty; data
// itself when there are none.
func (ps *Policies) otherKinds(origin string, data []byte) []byte {
	docs, err := splitDocuments(data)
	if err != nil {
		return data // the policy reader refuses the file
	}
	var others []document
	for _, d := range docs {
		var env struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
			Metadata   struct {
				Name      string `json:"name"`
				Namespace string `json:"namespace"`
			} `json:"metadata"`
		}
		if yaml.Unmarshal(d.raw, &env) != nil || env.Kind == "" || env.Kind == "AuthorizationPolicy" {
			continue
		}
		group, version, ok := strings.Cut(env.APIVersion, "/")
		if !ok {
			group, version = "", env.APIVersion
		}
		others = append(others, d)
		mk, ok := meshcheck.ByKind(group, env.Kind)
		if !ok {
			if ps.skipped == nil {
				ps.skipped = map[string]int{}
			}
			ps.skipped[env.Kind]++
			continue
		}
		ns := env.Metadata.Namespace
		if ns == "" {
			ns = ps.DefaultNamespace
		}
		ps.meshObjects++
		object := env.Kind + " " + ns + "/" + env.Metadata.Name
		where := fmt.Sprintf("%s:%d", origin, d.start+1)
		check := mk.Check(version)
		if check == nil {
			ps.findings = append(ps.findings, Finding{Code: CodeInvalid, Severity: SeverityError, Object: object, Origin: where,
				Message: fmt.Sprintf("%s is not a version of %s that trustmesh reads: want %s/%s",
					env.APIVersion, env.Kind, mk.Group, strings.Join(mk.Versions, " or "+mk.Group+"/"))})
			continue
		}
		js, err := yaml.YAMLToJSON(d.raw)
		if err == nil {
			var refs []mesh.Refusal
			if refs, err = check(js, ps.DefaultNamespace); err == nil {
				for _, r := range refs {
					f := refusalFinding(r)
					f.Origin = where
					ps.findings = append(ps.findings, f)
				}
				continue
			}
		}
		ps.findings = append(ps.findings, Finding{Code: CodeInvalid, Severity: SeverityError, Object: object, Origin: where,
			Message: err.Error()})
	}
	if len(others) == 0 {
		return data
	}
	return blank(data, others)
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

// blank returns data with every line of the documents blanked: the same
// documents and lines, theirs empty.
func blank(data []byte, docs []document) []byte {
	lines := bytes.SplitAfter(data, []byte("\n"))
	for _, d := range docs {
		for i := d.start; i < d.end && i < len(lines); i++ {
			if bytes.HasSuffix(lines[i], []byte("\n")) {
				lines[i] = []byte("#\n")
			} else {
				lines[i] = nil
			}
		}
	}
	return bytes.Join(lines, nil)
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
