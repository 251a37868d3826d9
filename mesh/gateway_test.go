package mesh_test

import (
	"slices"
	"testing"

	networkingv1alpha3 "istio.io/api/networking/v1alpha3"

	"github.com/trustmesh/trustmesh/mesh"
)

// TestCheckGateway: the servers the mesh honours pass, each other server
// is refused by index, with what to use instead.
func TestCheckGateway(t *testing.T) {
	tls := func(mode networkingv1alpha3.ServerTLSSettings_TLSmode, cred string) *networkingv1alpha3.Server {
		return &networkingv1alpha3.Server{Port: &networkingv1alpha3.Port{Number: 443}, Hosts: []string{"a.example.com"},
			Tls: &networkingv1alpha3.ServerTLSSettings{Mode: mode, CredentialName: cred}}
	}
	gw := &networkingv1alpha3.Gateway{Servers: []*networkingv1alpha3.Server{
		tls(networkingv1alpha3.ServerTLSSettings_SIMPLE, "a-cert"),
		tls(networkingv1alpha3.ServerTLSSettings_ISTIO_MUTUAL, ""),
		tls(networkingv1alpha3.ServerTLSSettings_SIMPLE, ""),
		tls(networkingv1alpha3.ServerTLSSettings_PASSTHROUGH, ""),
		{Port: &networkingv1alpha3.Port{Number: 80}, Hosts: []string{"*"}},
	}}
	var got []string
	for _, r := range mesh.CheckGateway("edge", "in", gw) {
		got = append(got, r.String())
	}
	want := []string{
		"Gateway edge/in: servers[2]: only credentialName certificates are supported",
		"Gateway edge/in: servers[3]: tls.mode PASSTHROUGH is not supported; use SIMPLE (ingress) or ISTIO_MUTUAL (egress)",
		"Gateway edge/in: servers[4]: a server without tls is not supported; use tls.mode SIMPLE (ingress) or ISTIO_MUTUAL (egress)",
	}
	if !slices.Equal(got, want) {
		t.Errorf("refusals\n%q\nwant\n%q", got, want)
	}
	for i, sv := range gw.Servers {
		if mesh.GatewayServerOK(sv) != (i < 2) {
			t.Errorf("servers[%d]: GatewayServerOK %v", i, !(i < 2))
		}
	}
}
