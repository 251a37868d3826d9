package controlplane

import (
	"slices"
	"testing"

	"github.com/trustmesh/trustmesh/api/identity"
)

// TestControlPlaneIdentityDefaults: the control plane's own SPIFFE ID, the
// ext_authz address it tells proxies and its serving names default to the
// one control-plane identity (api/identity), in the configured trust
// domain.
func TestControlPlaneIdentityDefaults(t *testing.T) {
	v, err := Config{TrustDomain: "example.org", Kubernetes: KubernetesConfig{Mode: KubernetesOff}}.validate()
	if err != nil {
		t.Fatal(err)
	}
	if want := identity.ID("example.org", ""); v.cpID.String() != want || want != "spiffe://example.org/ns/trustmesh-system/sa/trustmesh" {
		t.Errorf("control plane ID = %s, want %s", v.cpID, want)
	}
	if want := identity.AuthzAddress(""); v.XDS.AuthzAddress != want {
		t.Errorf("authz address = %s, want %s", v.XDS.AuthzAddress, want)
	}
	if !slices.Contains(v.dns, identity.Host("")) {
		t.Errorf("serving names %q lack the control plane's Service %s", v.dns, identity.Host(""))
	}
}
