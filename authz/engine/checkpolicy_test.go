package engine_test

import (
	"context"
	"errors"
	"testing"

	securityv1beta1 "istio.io/api/security/v1beta1"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// TestCheckPolicyIsBuildsCheck holds Build to CheckPolicy, the check the
// admission webhook makes of one object: a policy CheckPolicy refuses is
// refused by Build with the same error, a *policy.FieldError naming the
// field, and one it admits builds.
func TestCheckPolicyIsBuildsCheck(t *testing.T) {
	custom := func(name, provider string) *policy.Policy {
		p, err := policy.FromSpec(policy.Meta{Namespace: "shop", Name: name, Origin: "test " + name}, &securityv1beta1.AuthorizationPolicy{
			Action:       securityv1beta1.AuthorizationPolicy_CUSTOM,
			ActionDetail: &securityv1beta1.AuthorizationPolicy_Provider{Provider: &securityv1beta1.AuthorizationPolicy_ExtensionProvider{Name: provider}},
			Rules:        []*securityv1beta1.Rule{{}},
		})
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	for _, provider := range []string{"opa", "rego:", "rego:a//b"} {
		p := custom("ext", provider)
		checkErr := engine.CheckPolicy(p)
		var fe *policy.FieldError
		if !errors.As(checkErr, &fe) || fe.Field != "spec.provider.name" || fe.Policy != "shop/ext" || !errors.Is(checkErr, engine.ErrUnknownProvider) {
			t.Fatalf("%q: CheckPolicy: %v, want a FieldError of spec.provider.name", provider, checkErr)
		}
		ok := custom("fine", "rego:envoy/authz/allow")
		_, buildErr := engine.Build(context.Background(), engine.SetConfig{Policies: []*policy.Policy{ok, p}})
		if buildErr == nil || buildErr.Error() != checkErr.Error() {
			t.Errorf("%q: Build refuses with\n%v\nCheckPolicy with\n%v", provider, buildErr, checkErr)
		}
	}
	// A well-named provider passes CheckPolicy; whether a bundle defines it
	// is the set's business.
	p := custom("ext", "rego:nobody/allow")
	if err := engine.CheckPolicy(p); err != nil {
		t.Fatal(err)
	}
	var mb *engine.MissingBundleError
	if _, err := engine.Build(context.Background(), engine.SetConfig{Policies: []*policy.Policy{p}}); !errors.As(err, &mb) {
		t.Fatalf("Build without bundles: %v, want a MissingBundleError", err)
	}
}

// TestCheckProviderIsBuildsCheck holds Set.CheckProvider, the check the
// admission webhook asks of the set in force, to Build: a CUSTOM policy
// whose provider the set's bundles do not define is refused by both with
// the same error, as field spec.provider.name; one they define passes, and
// a set built without bundles refuses every CUSTOM policy.
func TestCheckProviderIsBuildsCheck(t *testing.T) {
	ctx := context.Background()
	ps, err := policy.ParseYAML("t.yaml", []byte(customAll), "default")
	if err != nil {
		t.Fatal(err)
	}
	defined := ps[0] // rego:slow/allow
	missing := *defined
	missing.Provider = "rego:nowhere/allow"
	allow := &policy.Policy{Namespace: "default", Name: "allow", Origin: "t", Action: policy.Allow}
	for _, bundles := range [][]engine.NamedBundle{{bundleOf(t, slowRego)}, nil} {
		set, err := engine.Build(ctx, engine.SetConfig{Bundles: bundles})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range []*policy.Policy{defined, &missing} {
			checkErr := set.CheckProvider(p)
			_, buildErr := engine.Build(ctx, engine.SetConfig{Policies: []*policy.Policy{p}, Bundles: bundles})
			if (checkErr == nil) != (buildErr == nil) || checkErr != nil && checkErr.Error() != buildErr.Error() {
				t.Errorf("%d bundles, %s: CheckProvider: %v\nBuild: %v", len(bundles), p.Provider, checkErr, buildErr)
			}
			var fe *policy.FieldError
			var mb *engine.MissingBundleError
			wantRefused := p == &missing || bundles == nil
			if wantRefused && (!errors.As(checkErr, &fe) || fe.Field != "spec.provider.name" || !errors.As(checkErr, &mb)) {
				t.Errorf("%d bundles, %s: CheckProvider: %v, want a FieldError of spec.provider.name wrapping a MissingBundleError", len(bundles), p.Provider, checkErr)
			}
			if !wantRefused && checkErr != nil {
				t.Errorf("%s: defined, yet refused: %v", p.Provider, checkErr)
			}
		}
		if err := set.CheckProvider(allow); err != nil {
			t.Errorf("an ALLOW policy: %v", err)
		}
	}
}
