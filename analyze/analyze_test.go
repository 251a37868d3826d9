package analyze

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/mesh"
)

// A case file, testdata/cases/<CODE>_<report|quiet>[_more].yaml, is
// multi-document YAML:
//   - AuthorizationPolicies (and any other document that is not a mesh
//     document), loaded with the command's loader, Policies.AddFile, so a
//     refused one is a TMA000 finding that names the case file's line;
//   - mesh documents (mesh.trustmesh.io kinds, PeerAuthentication,
//     ServiceEntry), written to a directory and read by mesh.Dir, the mesh
//     parser serve uses;
//   - exactly one `kind: Expect` document (see expect).
//
// Only the analyzer the Expect names runs (TMA000: the loader), and its
// findings must be exactly those listed, by code, object and field, each
// with a message. A report case lists some; a quiet case lists none.

// expect is a case file's `kind: Expect` document.
type expect struct {
	Kind          string `json:"kind"`
	Analyzer      string `json:"analyzer"`
	RootNamespace string `json:"rootNamespace"`
	TrustDomain   string `json:"trustDomain"`
	Now           string `json:"now"`
	StaleDryRun   string `json:"staleDryRun"`
	// Created maps ns/name to a creationTimestamp (RFC 3339); set, the
	// case runs as on a cluster.
	Created map[string]string `json:"created"`
	// Mesh loads an (empty) mesh even when the case has no mesh
	// documents.
	Mesh bool `json:"mesh"`
	// Bundles are bundle directories, relative to testdata.
	Bundles []string `json:"bundles"`
	// Note, when set, must appear in the analyzer's note.
	Note     string `json:"note"`
	Findings []struct {
		Code   string `json:"code"`
		Object string `json:"object"`
		Field  string `json:"field"`
	} `json:"findings"`
}

// isMeshDoc reports whether a case document belongs to the mesh files.
func isMeshDoc(apiVersion, kind string) bool {
	return strings.HasPrefix(apiVersion, "mesh.trustmesh.io/") ||
		kind == "PeerAuthentication" || kind == "ServiceEntry"
}

// loadCase splits a case file into its policies (through the loader, so
// refused objects are TMA000 findings), its mesh (through mesh.Dir) and
// its expectation.
func loadCase(t *testing.T, path string) (*Input, []Finding, expect) {
	t.Helper()
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	docs, err := splitDocuments(data)
	if err != nil {
		t.Fatal(err)
	}
	var (
		exp      expect
		nExpect  int
		meshDocs [][]byte
		polDocs  []document
	)
	for _, d := range docs {
		var head struct {
			APIVersion string `json:"apiVersion"`
			Kind       string `json:"kind"`
		}
		if err := yaml.Unmarshal(d.raw, &head); err != nil {
			t.Fatalf("%s: %v", path, err)
		}
		switch {
		case head.Kind == "Expect":
			nExpect++
			if err := yaml.UnmarshalStrict(d.raw, &exp); err != nil {
				t.Fatalf("%s: Expect: %v", path, err)
			}
		case isMeshDoc(head.APIVersion, head.Kind):
			meshDocs = append(meshDocs, d.raw)
		default:
			polDocs = append(polDocs, d)
		}
	}
	if nExpect != 1 {
		t.Fatalf("%s: want exactly one kind: Expect document, got %d", path, nExpect)
	}
	in := &Input{RootNamespace: exp.RootNamespace, TrustDomain: spiffeid.RequireTrustDomainFromString("cluster.local"), StaleDryRun: 14 * 24 * time.Hour}
	if in.RootNamespace == "" {
		in.RootNamespace = engine.DefaultRootNamespace
	}
	if exp.TrustDomain != "" {
		in.TrustDomain = spiffeid.RequireTrustDomainFromString(exp.TrustDomain)
	}
	in.Now = time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	if exp.Now != "" {
		if in.Now, err = time.Parse(time.RFC3339, exp.Now); err != nil {
			t.Fatal(err)
		}
	}
	if exp.StaleDryRun != "" {
		if in.StaleDryRun, err = time.ParseDuration(exp.StaleDryRun); err != nil {
			t.Fatal(err)
		}
	}
	if exp.Created != nil {
		in.Created = map[string]time.Time{}
		for k, v := range exp.Created {
			if in.Created[k], err = time.Parse(time.RFC3339, v); err != nil {
				t.Fatal(err)
			}
		}
	}

	// Policies: the case file itself, with every other document blanked,
	// so that refusals name the case file's lines.
	ps := &Policies{DefaultNamespace: "default"}
	for _, d := range polDocs {
		ps.AddFile(path, d.only(data))
	}
	in.Policies = ps.Policies()

	if len(meshDocs) > 0 || exp.Mesh {
		dir := t.TempDir()
		if len(meshDocs) > 0 {
			if err := os.WriteFile(filepath.Join(dir, "mesh.yaml"), bytes.Join(meshDocs, []byte("\n---\n")), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		m, err := (&mesh.Dir{Path: dir}).Mesh()
		if err != nil {
			t.Fatalf("%s: mesh: %v", path, err)
		}
		in.Mesh = m
	}

	if exp.Bundles != nil {
		var nbs []engine.NamedBundle
		for _, b := range exp.Bundles {
			p := filepath.Join("testdata", b)
			bl, err := source.LoadBundle(source.BundleConfig{Path: p})
			if err != nil {
				t.Fatal(err)
			}
			nbs = append(nbs, engine.NamedBundle{Name: p, Bundle: bl})
		}
		in.Providers, err = EngineProviders(context.Background(), nbs)
		if err != nil {
			t.Fatal(err)
		}
	}
	return in, ps.Findings(), exp
}

// TestCases runs every case file in testdata/cases: only the analyzer its
// Expect names, asserting exactly the findings it lists.
func TestCases(t *testing.T) {
	files, err := filepath.Glob("testdata/cases/*.yaml")
	if err != nil {
		t.Fatal(err)
	}
	if len(files) == 0 {
		t.Fatal("no case files")
	}
	for _, path := range files {
		name := strings.TrimSuffix(filepath.Base(path), ".yaml")
		t.Run(name, func(t *testing.T) {
			code, kind, _ := strings.Cut(name, "_")
			kind, _, _ = strings.Cut(kind, "_")
			in, invalid, exp := loadCase(t, path)
			if exp.Analyzer != code {
				t.Fatalf("file is named for %s but Expect names analyzer %s", code, exp.Analyzer)
			}
			switch kind {
			case "report":
				if len(exp.Findings) == 0 {
					t.Fatal("a report case must expect findings")
				}
			case "quiet":
				if len(exp.Findings) != 0 {
					t.Fatal("a quiet case must expect findings: []")
				}
			default:
				t.Fatalf("case file name %q: want CODE_report or CODE_quiet, optionally _more", name)
			}
			var rep Report
			if code == CodeInvalid {
				rep = Report{Findings: invalid}
				Sort(rep.Findings)
			} else {
				if len(invalid) > 0 {
					t.Fatalf("the case's policies are refused: %v", invalid)
				}
				i := slices.IndexFunc(All, func(a Analyzer) bool { return a.Code == code })
				if i < 0 {
					t.Fatalf("no analyzer %s in All", code)
				}
				rep = Run(in, All[i:i+1])
			}
			if exp.Note != "" && !slices.ContainsFunc(rep.Notes, func(n string) bool { return strings.Contains(n, exp.Note) }) {
				t.Errorf("notes %q do not say %q", rep.Notes, exp.Note)
			}
			type key struct{ Code, Object, Field string }
			var got, want []key
			for _, f := range rep.Findings {
				t.Logf("%s %s %s %s: %s", f.Code, f.Severity, f.Object, f.Field, f.Message)
				got = append(got, key{f.Code, f.Object, f.Field})
				if strings.TrimSpace(f.Message) == "" {
					t.Errorf("finding %+v has no message", f)
				}
				if f.Severity.Rank() == 0 {
					t.Errorf("finding %+v has no valid severity", f)
				}
			}
			for _, f := range exp.Findings {
				want = append(want, key{f.Code, f.Object, f.Field})
			}
			slices.SortFunc(got, func(a, b key) int { return strings.Compare(a.Code+a.Object+a.Field, b.Code+b.Object+b.Field) })
			slices.SortFunc(want, func(a, b key) int { return strings.Compare(a.Code+a.Object+a.Field, b.Code+b.Object+b.Field) })
			if !slices.Equal(got, want) {
				t.Errorf("findings:\n got %+v\nwant %+v\nfull: %+v\nnotes: %q", got, want, rep.Findings, rep.Notes)
			}
		})
	}
}
