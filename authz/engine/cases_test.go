package engine_test

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"sigs.k8s.io/yaml"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/authz/source"
)

// caseFile is one authz/testdata/cases/*.yaml file: policies (and bundles)
// shared by its cases, and requests with their expected decisions.
type caseFile struct {
	RootNamespace string                `json:"root_namespace"`
	Policies      string                `json:"policies"`
	Bundles       map[string]caseBundle `json:"bundles"`
	// LoadError, if set, is a substring of the error loading must give.
	LoadError string     `json:"load_error"`
	Cases     []caseSpec `json:"cases"`
}

type caseBundle struct {
	Files  map[string]string `json:"files"`
	RegoV0 bool              `json:"rego_v0"`
}

type caseSpec struct {
	Name    string      `json:"name"`
	Request caseRequest `json:"request"`
	Want    caseWant    `json:"want"`
}

type caseRequest struct {
	Source      *casePeer `json:"source"`
	Destination *casePeer `json:"destination"`
	SNI         string    `json:"sni"`
	TCP         bool      `json:"tcp"`
	HTTP        caseHTTP  `json:"http"`
}

type casePeer struct {
	Principal *string           `json:"principal"`
	IP        *string           `json:"ip"`
	Port      *uint32           `json:"port"`
	Labels    map[string]string `json:"labels"`
}

type caseHTTP struct {
	Method  string            `json:"method"`
	Host    string            `json:"host"`
	Path    string            `json:"path"`
	Headers map[string]string `json:"headers"`
	Body    string            `json:"body"`
}

type caseWant struct {
	Allowed bool              `json:"allowed"`
	Policy  *string           `json:"policy"` // "" means no policy decided
	Rule    *int              `json:"rule"`
	Reason  string            `json:"reason"`
	Status  int               `json:"status"`
	Headers map[string]string `json:"headers"`
	Body    string            `json:"body"`
	Audit   []engine.Match    `json:"audit"`
	// DryRunAllowed is the shadow decision of dry-run policies.
	DryRunAllowed *bool `json:"dry_run_allowed"`
	Error         bool  `json:"error"`
}

func (r caseRequest) checkRequest() *authv3.CheckRequest {
	src := casePeer{Principal: ptr("spiffe://cluster.local/ns/bar/sa/client"), IP: ptr("10.0.0.1"), Port: ptr[uint32](43210)}
	if r.Source != nil {
		merge(&src, r.Source)
	}
	dst := casePeer{Principal: ptr("spiffe://cluster.local/ns/foo/sa/web"), IP: ptr("10.0.0.2"), Port: ptr[uint32](8080), Labels: map[string]string{"app": "web"}}
	if r.Destination != nil {
		merge(&dst, r.Destination)
	}
	a := &authv3.AttributeContext{
		Source:      peer(src),
		Destination: peer(dst),
	}
	if r.SNI != "" {
		a.TlsSession = &authv3.AttributeContext_TLSSession{Sni: r.SNI}
	}
	if !r.TCP {
		h := r.HTTP
		if h.Method == "" {
			h.Method = "GET"
		}
		if h.Host == "" {
			h.Host = "web.foo.svc"
		}
		if h.Path == "" {
			h.Path = "/"
		}
		a.Request = &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: h.Method, Host: h.Host, Path: h.Path, Headers: h.Headers, Body: h.Body, Protocol: "HTTP/1.1",
		}}
	}
	return &authv3.CheckRequest{Attributes: a}
}

func merge(dst, src *casePeer) {
	if src.Principal != nil {
		dst.Principal = src.Principal
	}
	if src.IP != nil {
		dst.IP = src.IP
	}
	if src.Port != nil {
		dst.Port = src.Port
	}
	if src.Labels != nil {
		dst.Labels = src.Labels
	}
}

func peer(p casePeer) *authv3.AttributeContext_Peer {
	return &authv3.AttributeContext_Peer{
		Principal: *p.Principal,
		Labels:    p.Labels,
		Address: &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: *p.IP, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: *p.Port},
		}}},
	}
}

func ptr[T any](v T) *T { return &v }

// loadCaseFile builds the Set a case file describes.
func loadCaseFile(t *testing.T, cf *caseFile) (*engine.Set, error) {
	t.Helper()
	dir := t.TempDir()
	pdir := filepath.Join(dir, "policies")
	if err := os.MkdirAll(pdir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(pdir, "policies.yaml"), []byte(cf.Policies), 0o644); err != nil {
		t.Fatal(err)
	}
	cfg := source.Config{
		Engine:        engine.New(),
		Policies:      &source.Dir{Path: pdir, DefaultNamespace: "default"},
		RootNamespace: cf.RootNamespace,
	}
	for name, b := range cf.Bundles {
		bdir := filepath.Join(dir, "bundles", name)
		for fn, content := range b.Files {
			p := filepath.Join(bdir, fn)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte(content), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		cfg.Bundles = append(cfg.Bundles, source.BundleConfig{Path: bdir, RegoV0: b.RegoV0})
	}
	l, err := source.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return l.Build(context.Background())
}

// TestCases runs every authz/testdata/cases/*.yaml file.
func TestCases(t *testing.T) {
	files, err := filepath.Glob("../testdata/cases/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no case files: %v", err)
	}
	for _, f := range files {
		t.Run(strings.TrimSuffix(filepath.Base(f), ".yaml"), func(t *testing.T) {
			raw, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			var cf caseFile
			if err := yaml.UnmarshalStrict(raw, &cf); err != nil {
				t.Fatalf("%s: %v", f, err)
			}
			set, err := loadCaseFile(t, &cf)
			if cf.LoadError != "" {
				if err == nil {
					t.Fatalf("load succeeded, want an error containing %q", cf.LoadError)
				}
				if !strings.Contains(err.Error(), cf.LoadError) {
					t.Fatalf("load error %q does not mention %q", err, cf.LoadError)
				}
				return
			}
			if err != nil {
				t.Fatalf("load: %v", err)
			}
			for _, c := range cf.Cases {
				t.Run(c.Name, func(t *testing.T) {
					d, err := set.Check(context.Background(), c.Request.checkRequest())
					checkDecision(t, d, err, c.Want)
				})
			}
		})
	}
}

func checkDecision(t *testing.T, d *engine.Decision, err error, w caseWant) {
	t.Helper()
	if (err != nil) != w.Error {
		t.Fatalf("error = %v, want error %v", err, w.Error)
	}
	if d.Allowed != w.Allowed {
		t.Fatalf("allowed = %v (%s, policy %q, error %q), want %v", d.Allowed, d.Reason, d.Policy, d.Error, w.Allowed)
	}
	if w.Policy != nil && d.Policy != *w.Policy {
		t.Errorf("policy = %q, want %q", d.Policy, *w.Policy)
	}
	if w.Rule != nil && (d.Rule == nil || *d.Rule != *w.Rule) {
		t.Errorf("rule = %v, want %d", deref(d.Rule), *w.Rule)
	}
	if w.Reason != "" && d.Reason != w.Reason {
		t.Errorf("reason = %q, want %q", d.Reason, w.Reason)
	}
	if w.Status != 0 && d.HTTPStatus != w.Status {
		t.Errorf("status = %d, want %d", d.HTTPStatus, w.Status)
	}
	for k, v := range w.Headers {
		found := false
		for _, h := range d.Headers {
			if h.Key == k && h.Value == v {
				found = true
			}
		}
		if !found {
			t.Errorf("headers %v lack %s: %s", d.Headers, k, v)
		}
	}
	if w.Body != "" && d.Body != w.Body {
		t.Errorf("body = %q, want %q", d.Body, w.Body)
	}
	if w.Audit != nil && !equalMatches(d.Audit, w.Audit) {
		t.Errorf("audit = %v, want %v", d.Audit, w.Audit)
	}
	if w.DryRunAllowed != nil && (d.DryRun == nil || d.DryRun.Allowed != *w.DryRunAllowed) {
		t.Errorf("dry run = %+v, want allowed %v", d.DryRun, *w.DryRunAllowed)
	}
}

func equalMatches(a, b []engine.Match) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

func deref(p *int) any {
	if p == nil {
		return nil
	}
	return *p
}

var _ = policy.Allow
