package admission_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	admissionv1 "k8s.io/api/admission/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/runtime"
	k8syaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/admission"
	"github.com/trustmesh/trustmesh/analyze"
	"github.com/trustmesh/trustmesh/authz/casefile"
	"github.com/trustmesh/trustmesh/authz/conformance"
	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
)

// The three ways trustmesh judges one AuthorizationPolicy, which must give
// one answer: the engine's load (a policy source, the Loader and
// engine.Build), trustmesh analyze (its file loader's TMA000 findings), and
// the admission webhook (its handler, over HTTP).
type judges struct {
	t       *testing.T
	dir     string
	handler http.Handler
	n       int
}

func newJudges(t *testing.T) *judges {
	h, err := admission.NewHandler(admission.HandlerConfig{Log: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	return &judges{t: t, dir: t.TempDir(), handler: h}
}

// refusal is a judge's answer: nil for accepted; otherwise the refused
// fields, each "field: reason", in order, and the whole message.
type refusal struct {
	fields  []string
	message string
}

func (r *refusal) String() string {
	if r == nil {
		return "accepted"
	}
	return fmt.Sprintf("refused %q", r.fields)
}

func fieldsOf(err error) []string {
	var out []string
	for _, fe := range admission.FieldErrors(err) {
		out = append(out, fe.Field+": "+fe.Err.Error())
	}
	return out
}

// load is the engine's load of the documents, with the bundles, as
// `trustmesh authz --policies DIR --bundle DIR` or `serve` loads them.
func (j *judges) load(doc []byte, bundles map[string]casefile.Bundle) (*refusal, error) {
	j.n++
	dir := filepath.Join(j.dir, fmt.Sprint(j.n))
	pdir := filepath.Join(dir, "policies")
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		j.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pdir, "policy.yaml"), doc, 0o644); err != nil {
		j.t.Fatal(err)
	}
	cfg := source.Config{Engine: engine.New(), Policies: &source.Dir{Path: pdir, DefaultNamespace: "default"}}
	cfg.Bundles = j.writeBundles(dir, bundles)
	l, err := source.New(cfg)
	if err != nil {
		j.t.Fatal(err)
	}
	if _, err := l.Build(context.Background()); err != nil {
		return &refusal{fields: fieldsOf(err), message: err.Error()}, err
	}
	return nil, nil
}

// writeBundles writes a case file's bundles under dir.
func (j *judges) writeBundles(dir string, bundles map[string]casefile.Bundle) []source.BundleConfig {
	var out []source.BundleConfig
	for name, b := range bundles {
		bdir := filepath.Join(dir, "bundles", name)
		for fn, content := range b.Files {
			p := filepath.Join(bdir, fn)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				j.t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
				j.t.Fatal(err)
			}
		}
		out = append(out, source.BundleConfig{Path: bdir, RegoV0: b.RegoV0})
	}
	return out
}

// servedProviders is the webhook's provider check in a serve that loads
// these bundles: the set in force of a Loader of them, as serve's. It is
// false when the bundles do not load, and serve would not start.
func (j *judges) servedProviders(bundles map[string]casefile.Bundle) (admission.Providers, bool) {
	if len(bundles) == 0 {
		return nil, true // serve without bundles
	}
	j.n++
	l, err := source.New(source.Config{Engine: engine.New(), Bundles: j.writeBundles(filepath.Join(j.dir, fmt.Sprint(j.n)), bundles)})
	if err != nil {
		j.t.Fatal(err)
	}
	set, err := l.Build(context.Background())
	if err != nil {
		return nil, false
	}
	return set.CheckProvider, true
}

// analyze is trustmesh analyze's verdict: its TMA000 findings.
func (j *judges) analyze(doc []byte) *refusal {
	var ps analyze.Policies
	ps.DefaultNamespace = "default"
	ps.AddFile("policy.yaml", doc)
	fs := ps.Findings()
	if len(fs) == 0 {
		return nil
	}
	r := &refusal{}
	for _, f := range fs {
		if f.Code != analyze.CodeInvalid {
			j.t.Fatalf("the loader found %s", f.Code)
		}
		r.message += f.Message + "\n"
	}
	return r
}

// webhook is the webhook's verdict on the document created in a cluster,
// with the provider check of a serve that loads the bundles.
func (j *judges) webhook(doc []byte, providers admission.Providers) *refusal {
	js, err := yaml.YAMLToJSON(doc)
	if err != nil {
		j.t.Fatal(err)
	}
	var meta struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name, Namespace string
		} `json:"metadata"`
	}
	if err := json.Unmarshal(js, &meta); err != nil {
		j.t.Fatal(err)
	}
	if meta.Metadata.Namespace == "" {
		// The apiserver puts the object in the request's namespace.
		meta.Metadata.Namespace = "default"
		var obj map[string]any
		_ = json.Unmarshal(js, &obj)
		obj["metadata"].(map[string]any)["namespace"] = "default"
		js, _ = json.Marshal(obj)
	}
	group, version, _ := strings.Cut(meta.APIVersion, "/")
	body, _ := json.Marshal(admissionv1.AdmissionReview{
		TypeMeta: metav1.TypeMeta{APIVersion: "admission.k8s.io/v1", Kind: "AdmissionReview"},
		Request: &admissionv1.AdmissionRequest{
			UID:       "uid",
			Kind:      metav1.GroupVersionKind{Group: group, Version: version, Kind: meta.Kind},
			Resource:  metav1.GroupVersionResource{Group: group, Version: version, Resource: "authorizationpolicies"},
			Name:      meta.Metadata.Name,
			Namespace: meta.Metadata.Namespace,
			Operation: admissionv1.Create,
			Object:    runtime.RawExtension{Raw: js},
		},
	})
	rec := httptest.NewRecorder()
	r := httptest.NewRequest(http.MethodPost, admission.Path, bytes.NewReader(body))
	r.Header.Set("Content-Type", "application/json")
	h := j.handler
	if providers != nil {
		var err error
		if h, err = admission.NewHandler(admission.HandlerConfig{Log: slog.New(slog.DiscardHandler), Providers: providers}); err != nil {
			j.t.Fatal(err)
		}
	}
	h.ServeHTTP(rec, r)
	var out admissionv1.AdmissionReview
	if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || out.Response == nil {
		j.t.Fatalf("webhook answered %d %s", rec.Code, rec.Body)
	}
	if out.Response.Allowed {
		return nil
	}
	ref := &refusal{message: out.Response.Result.Message}
	if d := out.Response.Result.Details; d != nil {
		for _, c := range d.Causes {
			ref.fields = append(ref.fields, c.Field+": "+c.Message)
		}
	}
	return ref
}

// agree judges one document three ways and fails t unless all three
// accept, or all three refuse naming the same fields for the same reasons.
// It returns the load's refusal, and whether it is the bundles'. A CUSTOM
// provider that no loaded bundle defines depends on the bundles: the
// webhook, holding the bundles serve loads, refuses it as the load does,
// field and reason; analyze's per-object check does not (it reports it as
// TMA021 when given the bundles). Bundles that do not load stop serve
// itself, so only the load judges them. A duplicate namespace/name is not
// judged: a cluster cannot hold one.
func (j *judges) agree(t *testing.T, what string, doc []byte, bundles map[string]casefile.Bundle) (ref *refusal, setLevel bool) {
	t.Helper()
	load, loadErr := j.load(doc, bundles)
	providers, served := j.servedProviders(bundles)
	if !served {
		if load == nil || len(load.fields) != 0 {
			t.Errorf("%s: the bundles do not load on their own, yet the load gives %v", what, loadErr)
		}
		return load, true
	}
	an, wh := j.analyze(doc), j.webhook(doc, providers)
	var mb *engine.MissingBundleError
	if errors.As(loadErr, &mb) {
		if an != nil || wh == nil || !slices.Equal(load.fields, wh.fields) || len(load.fields) != 1 ||
			!strings.HasPrefix(load.fields[0], "spec.provider.name: ") || !strings.Contains(wh.message, load.fields[0]) {
			t.Errorf("%s: the load refuses the provider\n%q\nthe webhook %v (%v), analyze %v", what, load.fields, wh, wh, an)
		}
		return load, true
	}
	if (load == nil) != (wh == nil) || (load == nil) != (an == nil) {
		t.Errorf("%s: load %v, analyze %v, webhook %v\nload: %v\nwebhook: %v\nanalyze: %v\n%s",
			what, load, an, wh, loadErr, wh, an, doc)
		return load, false
	}
	if load == nil {
		return nil, false
	}
	if len(load.fields) == 0 {
		// Not a field's refusal (the document does not decode): the
		// webhook too denies without causes.
		if len(wh.fields) != 0 {
			t.Errorf("%s: the load refuses without a field (%v), the webhook names %q", what, loadErr, wh.fields)
		}
		return load, false
	}
	if !slices.Equal(load.fields, wh.fields) {
		t.Errorf("%s: the load refuses\n%q\nthe webhook\n%q", what, load.fields, wh.fields)
	}
	for _, f := range load.fields {
		if !strings.Contains(an.message, f) || !strings.Contains(wh.message, f) {
			t.Errorf("%s: %q is missing from a message\nanalyze: %s\nwebhook: %s", what, f, an.message, wh.message)
		}
	}
	return load, false
}

// documents splits YAML into its non-empty documents, as the engine's
// parser does.
func documents(t *testing.T, data string) [][]byte {
	r := k8syaml.NewYAMLReader(bufio.NewReader(strings.NewReader(data)))
	var out [][]byte
	for {
		raw, err := r.Read()
		if errors.Is(err, io.EOF) {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		if len(bytes.TrimSpace(raw)) > 0 {
			out = append(out, raw)
		}
	}
}

// TestCaseFilesAgree holds the load, analyze and the webhook to one answer
// over every case file's policies, each on its own.
func TestCaseFilesAgree(t *testing.T) {
	files, err := filepath.Glob("../authz/testdata/cases/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no case files: %v", err)
	}
	j := newJudges(t)
	refused, setRefused := 0, 0
	for _, f := range files {
		cf, err := casefile.Load(f)
		if err != nil {
			t.Fatal(err)
		}
		var objectRefusals []string
		fileSet := false
		for i, doc := range documents(t, cf.Policies) {
			r, set := j.agree(t, fmt.Sprintf("%s document %d", filepath.Base(f), i+1), doc, cf.Bundles)
			switch {
			case set:
				setRefused++
				fileSet = true
			case r != nil:
				refused++
				objectRefusals = append(objectRefusals, r.message)
			}
		}
		// A file whose load fails but not for the set's reasons fails at
		// an object, for the webhook's reason.
		if cf.LoadError != "" && !fileSet && !strings.Contains(strings.Join(objectRefusals, "\n"), cf.LoadError) {
			t.Errorf("%s: load_error %q is no object's refusal: %q", filepath.Base(f), cf.LoadError, objectRefusals)
		}
	}
	t.Logf("%d case files: %d objects refused by all three, %d for the bundles", len(files), refused, setRefused)
	if refused == 0 || setRefused == 0 {
		t.Error("the case files exercise no object refusal or no set refusal: the test proves nothing about them")
	}
}

// mutations make a valid policy invalid, each in a way the engine refuses.
// None adds an unknown field: the file parser refuses one (it could widen
// a policy), while in a cluster the CRD's structural schema prunes it, or
// refuses it under kubectl's strict field validation, before the webhook
// or the Kubernetes source ever see the object.
var mutations = []struct {
	name  string
	apply func(spec map[string]any)
}{
	{"requestPrincipals", func(s map[string]any) {
		rule(s)["from"] = []any{map[string]any{"source": map[string]any{"requestPrincipals": []any{"issuer/subject"}}}}
	}},
	{"notRequestPrincipals beside principals", func(s map[string]any) {
		rule(s)["from"] = []any{map[string]any{"source": map[string]any{
			"principals": []any{"cluster.local/ns/foo/sa/web"}, "notRequestPrincipals": []any{"*"}}}}
	}},
	{"port out of range", func(s map[string]any) {
		rule(s)["to"] = []any{map[string]any{"operation": map[string]any{"ports": []any{"65536"}}}}
	}},
	{"named port", func(s map[string]any) {
		rule(s)["to"] = []any{map[string]any{"operation": map[string]any{"notPorts": []any{"http"}}}}
	}},
	{"bad CIDR", func(s map[string]any) {
		rule(s)["from"] = []any{map[string]any{"source": map[string]any{"ipBlocks": []any{"10.0.0.0/33"}}}}
	}},
	{"bad remote CIDR in a condition", func(s map[string]any) {
		rule(s)["when"] = []any{map[string]any{"key": "remote.ip", "values": []any{"300.1.2.3"}}}
	}},
	{"unknown condition key", func(s map[string]any) {
		rule(s)["when"] = []any{map[string]any{"key": "request.auth.claims[iss]", "values": []any{"x"}}}
	}},
	{"provider not named rego:<path>", func(s map[string]any) {
		s["action"] = "CUSTOM"
		s["provider"] = map[string]any{"name": "opa"}
	}},
	{"provider with an empty path segment", func(s map[string]any) {
		s["action"] = "CUSTOM"
		s["provider"] = map[string]any{"name": "rego:envoy//allow"}
	}},
	{"provider on an ALLOW", func(s map[string]any) {
		s["action"] = "ALLOW"
		s["provider"] = map[string]any{"name": "rego:envoy/authz/allow"}
	}},
	{"more values than a policy may hold", func(s map[string]any) {
		var ns []any
		for i := range policy.MaxValues {
			ns = append(ns, fmt.Sprintf("n%d", i))
		}
		rule(s)["from"] = []any{map[string]any{"source": map[string]any{"namespaces": ns}}}
	}},
	{"targetRef", func(s map[string]any) {
		s["targetRef"] = map[string]any{"kind": "Gateway", "group": "gateway.networking.k8s.io", "name": "edge"}
	}},
}

// rule returns the spec's first rule, adding one if it has none.
func rule(spec map[string]any) map[string]any {
	rules, _ := spec["rules"].([]any)
	if len(rules) == 0 {
		rules = []any{map[string]any{}}
		spec["rules"] = rules
	}
	r, ok := rules[0].(map[string]any)
	if !ok {
		r = map[string]any{}
		rules[0] = r
	}
	return r
}

// TestCorpusAgrees holds the three to one answer over every distinct policy
// of the differential test's corpus, which Istio's own RBAC accepts, and
// over deterministic mutations of them that the engine refuses.
func TestCorpusAgrees(t *testing.T) {
	cases, err := conformance.ReadFile("../authz/testdata/istio-oracle/corpus-seed1.jsonl.gz")
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	var objs []map[string]any
	for _, c := range cases {
		var ps []map[string]any
		if err := json.Unmarshal(c.Policies, &ps); err != nil {
			t.Fatal(err)
		}
		for _, p := range ps {
			key, _ := json.Marshal(p)
			if !seen[string(key)] {
				seen[string(key)] = true
				objs = append(objs, p)
			}
		}
	}
	if testing.Short() {
		objs = objs[:200]
	}
	// Under the race detector, which finds nothing in this one goroutine's
	// computation, every tenth policy (the mutations still take turns):
	// make test runs them all once more without it.
	if raceEnabled {
		var sample []map[string]any
		for i := 0; i < len(objs); i += 10 {
			sample = append(sample, objs[i])
		}
		t.Logf("race detector on: checking every 10th of %d distinct corpus policies only; run without -race for all", len(objs))
		objs = sample
	}
	j := newJudges(t)
	var accepted, refused int
	for i, o := range objs {
		doc, err := yaml.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		if r, _ := j.agree(t, fmt.Sprintf("corpus policy %d", i), doc, nil); r == nil {
			accepted++
		} else {
			refused++
		}
		if i%5 != 0 {
			continue
		}
		// Every fifth policy, mutated, in turn, by each mutation.
		m := mutations[(i/5)%len(mutations)]
		mut := deepCopy(t, o)
		spec, _ := mut["spec"].(map[string]any)
		if spec == nil {
			spec = map[string]any{}
			mut["spec"] = spec
		}
		m.apply(spec)
		doc, err = yaml.Marshal(mut)
		if err != nil {
			t.Fatal(err)
		}
		if r, _ := j.agree(t, fmt.Sprintf("corpus policy %d mutated by %s", i, m.name), doc, nil); r == nil {
			t.Errorf("corpus policy %d mutated by %s: accepted by all three; the mutation should make it invalid", i, m.name)
		} else {
			refused++
		}
	}
	t.Logf("%d distinct corpus policies: %d accepted and %d refused by all three (mutations included)", len(objs), accepted, refused)
	if accepted == 0 || refused == 0 {
		t.Error("the corpus exercised only one answer")
	}
}

func deepCopy(t *testing.T, o map[string]any) map[string]any {
	b, err := json.Marshal(o)
	if err != nil {
		t.Fatal(err)
	}
	var out map[string]any
	if err := json.Unmarshal(b, &out); err != nil {
		t.Fatal(err)
	}
	return out
}
