package proxyconfig_test

import (
	"errors"
	"testing"

	rbacconfigv3 "github.com/envoyproxy/go-control-plane/envoy/config/rbac/v3"

	"github.com/trustmesh/trustmesh/authz/policy"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

func parse(t *testing.T, spec string) []*policy.Policy {
	t.Helper()
	ps, err := policy.ParseYAML("test", []byte("apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: p, namespace: ns-a}\nspec: "+spec+"\n"), "default")
	if err != nil {
		t.Fatal(err)
	}
	return ps
}

// TestProxylessRefusesWhatGRPCCannotEnforce: a policy grpc-go cannot
// enforce as the engine would makes the workload deny everything, with
// ErrProxyless, rather than enforce less than it says.
func TestProxylessRefusesWhatGRPCCannotEnforce(t *testing.T) {
	cases := map[string]struct {
		spec    string
		refused bool
	}{
		"connection.sni":       {`{rules: [{when: [{key: connection.sni, values: [a.example.com]}]}]}`, true},
		"CUSTOM":               {`{action: CUSTOM, provider: {name: "rego:x/allow"}, rules: [{}]}`, true},
		"a grpc- header":       {`{rules: [{when: [{key: "request.headers[grpc-timeout]", values: ["1S"]}]}]}`, true},
		"paths and principals": {`{rules: [{from: [{source: {principals: [cluster.local/ns/ns-a/sa/x]}}], to: [{operation: {paths: ["/a/*"]}}]}]}`, false},
		"another workload's":   {`{selector: {matchLabels: {app: other}}, rules: [{when: [{key: connection.sni, values: [a]}]}]}`, false},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			b := proxyconfig.NewBuilder(testConfig(t), &mesh.Mesh{}, parse(t, tc.spec))
			chain, err := b.ProxylessRBAC("ns-a", map[string]string{"app": "echo"})
			if got := errors.Is(err, proxyconfig.ErrProxyless); got != tc.refused {
				t.Fatalf("ProxylessRBAC() error = %v, want refused=%t", err, tc.refused)
			}
			if chain[0].GetRules().GetAction() != rbacconfigv3.RBAC_DENY {
				t.Fatal("the trust-domain rule is not first")
			}
			last := chain[len(chain)-1].GetRules()
			denyAll := last.GetAction() == rbacconfigv3.RBAC_ALLOW && len(last.GetPolicies()) == 0
			if denyAll != tc.refused {
				t.Fatalf("last filter = %v, want deny-all=%t", last, tc.refused)
			}
		})
	}
}
