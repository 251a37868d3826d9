package engine_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/bundle"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
)

const customAll = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: ext, namespace: istio-system}
spec:
  action: CUSTOM
  provider: {name: "rego:slow/allow"}
  rules: [{}]
`

// slowRego needs far more than a nanosecond to decide.
const slowRego = `package slow

import rego.v1

allow if {
	count([x | some x in numbers.range(1, 20000); x % 7 == 0]) > 0
}
`

func bundleOf(t *testing.T, src string) engine.NamedBundle {
	t.Helper()
	m, err := ast.ParseModuleWithOpts("slow.rego", src, ast.ParserOptions{RegoVersion: ast.RegoV1})
	if err != nil {
		t.Fatal(err)
	}
	return engine.NamedBundle{Name: "test", Bundle: &bundle.Bundle{
		Data:    map[string]any{},
		Modules: []bundle.ModuleFile{{Path: "slow.rego", Raw: []byte(src), Parsed: m}},
	}}
}

func TestEvalTimeoutDenies(t *testing.T) {
	ps, err := policy.ParseYAML("t.yaml", []byte(customAll), "default")
	if err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name    string
		timeout time.Duration
		allowed bool
	}{
		{"within the limit", time.Minute, true},
		{"out of time", time.Nanosecond, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			set, err := engine.Build(context.Background(), engine.SetConfig{
				Policies: ps, Bundles: []engine.NamedBundle{bundleOf(t, slowRego)}, EvalTimeout: tt.timeout,
			})
			if err != nil {
				t.Fatal(err)
			}
			d, err := set.Check(context.Background(), fuzzRequest("GET", "/", "", "", "web", "foo", false))
			if d.Allowed != tt.allowed {
				t.Fatalf("allowed = %v (%v), want %v", d.Allowed, err, tt.allowed)
			}
			if !tt.allowed && (!errors.Is(err, engine.ErrEvalTimeout) || d.HTTPStatus != 403) {
				t.Fatalf("error = %v, status %d; want ErrEvalTimeout and 403", err, d.HTTPStatus)
			}
		})
	}
}

func TestNoPolicySetDenies(t *testing.T) {
	d, err := engine.New().Check(context.Background(), fuzzRequest("GET", "/", "", "", "web", "foo", false))
	if !errors.Is(err, engine.ErrNoPolicySet) || d.Allowed || d.HTTPStatus != 403 {
		t.Fatalf("decision %+v, error %v; want a 403 denial with ErrNoPolicySet", d, err)
	}
}

// TestConcurrentChecksAndSwaps runs checks while sets are swapped; under
// -race it shows the engine is safe for the server's concurrent use.
func TestConcurrentChecksAndSwaps(t *testing.T) {
	build := func(path string) *engine.Set {
		ps, err := policy.ParseYAML("t.yaml", []byte(`apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny, namespace: foo}
spec:
  action: DENY
  rules:
  - to: [{operation: {paths: ["`+path+`"]}}]
`), "default")
		if err != nil {
			t.Fatal(err)
		}
		s, err := engine.Build(context.Background(), engine.SetConfig{Policies: ps})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	a, b := build("/a"), build("/b")
	e := engine.New()
	e.Swap(a)
	done := make(chan struct{})
	errs := make(chan error, 4)
	for range 4 {
		go func() {
			for i := 0; i < 200; i++ {
				da, err1 := e.Check(context.Background(), fuzzRequest("GET", "/a", "", "", "web", "foo", false))
				db, err2 := e.Check(context.Background(), fuzzRequest("GET", "/b", "", "", "web", "foo", false))
				if err1 != nil || err2 != nil {
					errs <- errors.Join(err1, err2)
					return
				}
				// Whichever set served, a denial names its DENY policy.
				for _, d := range []*engine.Decision{da, db} {
					if !d.Allowed && d.Policy != "foo/deny" {
						errs <- errors.New("denied without the deny policy")
						return
					}
				}
			}
			errs <- nil
		}()
	}
	go func() {
		for i := 0; i < 200; i++ {
			if i%2 == 0 {
				e.Swap(b)
			} else {
				e.Swap(a)
			}
		}
		close(done)
	}()
	for range 4 {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	<-done
}

func TestNormalizeHost(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"admin.example.com", "admin.example.com"},
		{"admin.example.com:443", "admin.example.com"},
		{"admin.example.com:", "admin.example.com"},
		{"admin.example.com.", "admin.example.com"},
		{"admin.example.com.:9080", "admin.example.com"},
		{"admin.example.com..", "admin.example.com."},
		{"admin.example.com:x", "admin.example.com:x"},
		{"[::1]:8080", "[::1]"},
		{"[::1]", "[::1]"},
		{"[::1]:", "[::1]"},
		{"::1", "::1"},
		{"10.0.0.1:80", "10.0.0.1"},
		{"", ""},
	} {
		if got := engine.NormalizeHost(tt.in); got != tt.want {
			t.Errorf("NormalizeHost(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
