package identity_test

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/api/identity"
)

func TestControlPlaneIdentity(t *testing.T) {
	for _, tc := range []struct {
		td, ns         string
		id, host, addr string
	}{
		{"cluster.local", "", "spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh",
			"trustmesh.trustmesh-system.svc", "trustmesh.trustmesh-system.svc:9191"},
		{"example.org", "mesh", "spiffe://example.org/ns/mesh/sa/trustmesh",
			"trustmesh.mesh.svc", "trustmesh.mesh.svc:9191"},
	} {
		id := identity.ID(tc.td, tc.ns)
		if id != tc.id {
			t.Errorf("ID(%q, %q) = %s, want %s", tc.td, tc.ns, id, tc.id)
		}
		if _, err := spiffeid.FromString(id); err != nil {
			t.Errorf("ID(%q, %q) is not a SPIFFE ID: %v", tc.td, tc.ns, err)
		}
		if got := identity.Host(tc.ns); got != tc.host {
			t.Errorf("Host(%q) = %s, want %s", tc.ns, got, tc.host)
		}
		if got := identity.AuthzAddress(tc.ns); got != tc.addr {
			t.Errorf("AuthzAddress(%q) = %s, want %s", tc.ns, got, tc.addr)
		}
	}
}
