package policy

import (
	"slices"
	"testing"
)

func TestApplicable(t *testing.T) {
	mk := func(ns, name string, sel map[string]string) *Policy {
		return &Policy{Namespace: ns, Name: name, Selector: sel}
	}
	ps := []*Policy{
		mk("istio-system", "mesh-wide", nil),
		mk("istio-system", "root-web", map[string]string{"app": "web"}),
		mk("foo", "all-of-foo", nil),
		mk("foo", "web", map[string]string{"app": "web"}),
		mk("foo", "web-v2", map[string]string{"app": "web", "version": "v2"}),
		mk("foo", "empty-selector", map[string]string{}),
		mk("bar", "other-namespace", nil),
	}
	for _, c := range []struct {
		name   string
		ns     string
		labels map[string]string
		want   []string
	}{
		{"every selector present", "foo", map[string]string{"app": "web", "version": "v2"},
			[]string{"mesh-wide", "root-web", "all-of-foo", "web", "web-v2", "empty-selector"}},
		{"a missing label does not match", "foo", map[string]string{"app": "web"},
			[]string{"mesh-wide", "root-web", "all-of-foo", "web", "empty-selector"}},
		{"a different value does not match", "foo", map[string]string{"app": "db"},
			[]string{"mesh-wide", "all-of-foo", "empty-selector"}},
		{"no labels", "foo", nil, []string{"mesh-wide", "all-of-foo", "empty-selector"}},
		{"other namespaces only see the root's", "baz", map[string]string{"app": "web"},
			[]string{"mesh-wide", "root-web"}},
		{"the root namespace sees its own once", "istio-system", nil, []string{"mesh-wide"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			var got []string
			for _, p := range Applicable(ps, "istio-system", c.ns, c.labels) {
				got = append(got, p.Name)
			}
			if !slices.Equal(got, c.want) {
				t.Errorf("Applicable = %v, want %v", got, c.want)
			}
		})
	}
}
