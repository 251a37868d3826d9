package engine_test

import (
	"context"
	"testing"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"

	"github.com/trustmesh/trustmesh/authz/engine"
	"github.com/trustmesh/trustmesh/authz/policy"
)

// hbonePolicies: namespace ports denies port 8080 to everyone and allows
// the rest; namespace paths denies GET /admin (an HTTP field, so for a TCP
// connection the DENY rule broadens to every connection).
const hbonePolicies = `apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-port, namespace: ports}
spec:
  action: DENY
  rules: [{to: [{operation: {ports: ["8080"]}}]}]
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: deny-admin, namespace: paths}
spec:
  action: DENY
  rules: [{to: [{operation: {paths: ["/admin"]}}]}]
`

// hboneCheck is what a sidecar's HBONE chain sends: the CONNECT on the
// tunnel's TLS connection (local port 15008), with the route's
// destination as a context extension.
func hboneCheck(ns, dest, method string) *authv3.CheckRequest {
	addr := func(ip string, port uint32) *corev3.Address {
		return &corev3.Address{Address: &corev3.Address_SocketAddress{SocketAddress: &corev3.SocketAddress{
			Address: ip, PortSpecifier: &corev3.SocketAddress_PortValue{PortValue: port}}}}
	}
	return &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source:      &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/client/sa/app", Address: addr("10.0.0.9", 40000)},
		Destination: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/" + ns + "/sa/app", Address: addr("10.0.1.1", 15008)},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{
			Method: method, Host: dest}},
		ContextExtensions: map[string]string{engine.HBONEDestinationExtension: dest},
	}}
}

// TestHBONECheckIsTCPToItsDestination: a tunnel is checked as a TCP
// connection to the destination its route names, not as an HTTP request
// to port 15008; a malformed one is an error (denied).
func TestHBONECheckIsTCPToItsDestination(t *testing.T) {
	ps, err := policy.ParseYAML("hbone.yaml", []byte(hbonePolicies), "istio-system")
	if err != nil {
		t.Fatal(err)
	}
	set, err := engine.Build(context.Background(), engine.SetConfig{Policies: ps})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		ns, dest string
		allowed  bool
	}{
		{"ports", "10.0.1.1:8080", false},
		{"ports", "10.0.1.1:9090", true},
		{"ports", "[fd00::1]:8080", false},
		{"paths", "10.0.1.1:9090", false}, // the DENY's HTTP field broadens it, as for TCP
	} {
		d, err := set.Check(context.Background(), hboneCheck(tc.ns, tc.dest, "CONNECT"))
		if err != nil {
			t.Fatalf("%s %s: %v", tc.ns, tc.dest, err)
		}
		if d.Allowed != tc.allowed {
			t.Errorf("%s %s: allowed = %t, want %t (%s)", tc.ns, tc.dest, d.Allowed, tc.allowed, d.Reason)
		}
	}
	for _, bad := range []*authv3.CheckRequest{hboneCheck("ports", "10.0.1.1", "CONNECT"), hboneCheck("ports", "10.0.1.1:9090", "GET")} {
		if d, err := set.Check(context.Background(), bad); err == nil && d.Allowed {
			t.Errorf("malformed HBONE check %v allowed", bad.GetAttributes().GetContextExtensions())
		}
	}
}
