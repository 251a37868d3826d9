package deploy_test

import (
	"fmt"
	"slices"
	"strings"
	"testing"

	admissionregistrationv1 "k8s.io/api/admissionregistration/v1"
	appsv1 "k8s.io/api/apps/v1"
	rbacv1 "k8s.io/api/rbac/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"

	"github.com/trustmesh/trustmesh/deploy"
)

// serveArgs are the control plane's arguments.
func serveArgs(t *testing.T, objs []*unstructured.Unstructured) []string {
	t.Helper()
	return convert[appsv1.Deployment](t, objs, "Deployment", "trustmesh").Spec.Template.Spec.Containers[0].Args
}

// clusterRoleGrants reports whether the chart's ClusterRole grants verb on
// resource.
func clusterRoleGrants(t *testing.T, objs []*unstructured.Unstructured, resource, verb string) bool {
	t.Helper()
	for _, o := range objs {
		if o.GetKind() != "ClusterRole" {
			continue
		}
		role := convert[rbacv1.ClusterRole](t, objs, "ClusterRole", o.GetName())
		for _, r := range role.Rules {
			if slices.Contains(r.Resources, resource) && (slices.Contains(r.Verbs, verb) || slices.Contains(r.Verbs, "*")) {
				return true
			}
		}
	}
	return false
}

// probeRoles are the Roles that may create AuthorizationPolicies, by
// namespace.
func probeRoles(t *testing.T, objs []*unstructured.Unstructured) []string {
	t.Helper()
	var out []string
	for _, o := range objs {
		if o.GetKind() != "Role" {
			continue
		}
		role := convert[rbacv1.Role](t, objs, "Role", o.GetName())
		for _, r := range role.Rules {
			if slices.Contains(r.Resources, "authorizationpolicies") && slices.Contains(r.Verbs, "create") {
				out = append(out, o.GetNamespace())
			}
		}
	}
	return out
}

// withValues merges over into base, one level deep.
func withValues(base map[string]any, over map[string]any) map[string]any {
	out := map[string]any{}
	for k, v := range base {
		out[k] = v
	}
	for k, v := range over {
		out[k] = v
	}
	return out
}

// validation.failurePolicy decides whether the control plane switches the
// validating webhook to Fail: auto does only with more than one replica,
// since with one a drain would block every write of the five kinds. Only
// then may the control plane create AuthorizationPolicies, for its probe,
// and only in the policy root namespace: the ClusterRole never may.
func TestValidationFailurePolicy(t *testing.T) {
	single := map[string]any{}
	for _, tc := range []struct {
		name       string
		values     map[string]any
		failClosed bool
		probeNS    string
	}{
		{"defaults: one replica, auto", nil, false, ""},
		{"several replicas, auto", haValues(), true, deploy.DefaultNamespace},
		{"one replica, Fail", withValues(single, map[string]any{"validation": map[string]any{"failurePolicy": "Fail"}}), true, deploy.DefaultNamespace},
		{"several replicas, Ignore", withValues(haValues(), map[string]any{"validation": map[string]any{"failurePolicy": "Ignore"}}), false, ""},
		{"several replicas, root namespace", withValues(haValues(), map[string]any{"authz": map[string]any{"rootNamespace": "istio-config"}}), true, "istio-config"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			objs, err := deploy.Render(deploy.RenderOptions{Values: tc.values})
			if err != nil {
				t.Fatal(err)
			}
			args := serveArgs(t, objs)
			if want := fmt.Sprintf("--validation-fail-closed=%v", tc.failClosed); !slices.Contains(args, want) {
				t.Errorf("serve is not given %s: %s", want, strings.Join(args, " "))
			}
			vwc := convert[admissionregistrationv1.ValidatingWebhookConfiguration](t, objs, "ValidatingWebhookConfiguration", "trustmesh-validator-"+deploy.DefaultNamespace)
			if w := vwc.Webhooks[0]; w.FailurePolicy == nil || *w.FailurePolicy != admissionregistrationv1.Ignore {
				t.Errorf("failurePolicy %v at install, want Ignore", w.FailurePolicy)
			}
			if clusterRoleGrants(t, objs, "authorizationpolicies", "create") {
				t.Error("the ClusterRole may create AuthorizationPolicies in every namespace")
			}
			want := []string(nil)
			if tc.probeNS != "" {
				want = []string{tc.probeNS}
			}
			if got := probeRoles(t, objs); !slices.Equal(got, want) {
				t.Errorf("Roles that may create AuthorizationPolicies are in %v, want %v", got, want)
			}
		})
	}
	if _, err := deploy.Render(deploy.RenderOptions{Values: map[string]any{"validation": map[string]any{"failurePolicy": "Sometimes"}}}); err == nil {
		t.Error("validation.failurePolicy Sometimes was rendered")
	}
}

// Each release names its own webhook, so that the API server's refusals
// say which release refused, and no release's webhook can be taken for
// another's.
func TestValidationWebhookNamedByRelease(t *testing.T) {
	for _, ns := range []string{"trustmesh", "canary"} {
		objs, err := deploy.Render(deploy.RenderOptions{Namespace: ns})
		if err != nil {
			t.Fatal(err)
		}
		vwc := convert[admissionregistrationv1.ValidatingWebhookConfiguration](t, objs, "ValidatingWebhookConfiguration", "trustmesh-validator-"+ns)
		if got, want := vwc.Webhooks[0].Name, "validation."+ns+".trustmesh.io"; got != want {
			t.Errorf("release in %s: webhook %q, want %q", ns, got, want)
		}
	}
}

// validation.enabled false installs no ValidatingWebhookConfiguration and
// no RBAC for it, and tells serve to keep none; with several replicas too.
func TestValidationDisabled(t *testing.T) {
	for name, values := range map[string]map[string]any{"one replica": {}, "several replicas": haValues()} {
		t.Run(name, func(t *testing.T) {
			objs, err := deploy.Render(deploy.RenderOptions{Values: withValues(values, map[string]any{"validation": map[string]any{"enabled": false}})})
			if err != nil {
				t.Fatal(err)
			}
			if n := kinds(objs)["ValidatingWebhookConfiguration"]; n != 0 {
				t.Errorf("%d ValidatingWebhookConfigurations, want none", n)
			}
			for _, verb := range []string{"get", "update"} {
				if clusterRoleGrants(t, objs, "validatingwebhookconfigurations", verb) {
					t.Errorf("the ClusterRole may %s validatingwebhookconfigurations", verb)
				}
			}
			if got := probeRoles(t, objs); len(got) != 0 {
				t.Errorf("Roles that may create AuthorizationPolicies in %v, want none", got)
			}
			args := serveArgs(t, objs)
			if !slices.Contains(args, "--validation-webhook-config=off") {
				t.Errorf("serve is not told to keep no webhook configuration: %s", strings.Join(args, " "))
			}
			for _, a := range args {
				if strings.HasPrefix(a, "--validation-fail-closed") {
					t.Errorf("serve is given %s with validation off", a)
				}
			}
		})
	}
	// On by default, with its RBAC.
	objs, err := deploy.Render(deploy.RenderOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if kinds(objs)["ValidatingWebhookConfiguration"] != 1 || !clusterRoleGrants(t, objs, "validatingwebhookconfigurations", "update") {
		t.Error("the default install has no validating webhook, or no RBAC to keep it")
	}
}

// NOTES.txt says when the validating webhook keeps Ignore, and why; with
// Fail, or with validation off, it says nothing of it.
func TestNotesSayWhenValidationKeepsIgnore(t *testing.T) {
	for _, tc := range []struct {
		name   string
		values map[string]any
		warns  bool
	}{
		{"defaults: one replica", nil, true},
		{"one replica, Ignore", map[string]any{"validation": map[string]any{"failurePolicy": "Ignore"}}, true},
		{"several replicas", haValues(), false},
		{"one replica, Fail", map[string]any{"validation": map[string]any{"failurePolicy": "Fail"}}, false},
		{"validation off", map[string]any{"validation": map[string]any{"enabled": false}}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			notes, err := deploy.Notes(deploy.RenderOptions{Values: tc.values})
			if err != nil {
				t.Fatal(err)
			}
			warns := strings.Contains(notes, "keeps failurePolicy Ignore") && strings.Contains(notes, "replicaCount > 1")
			if warns != tc.warns {
				t.Errorf("NOTES.txt says the webhook keeps Ignore: %v, want %v:\n%s", warns, tc.warns, notes)
			}
		})
	}
}
