package controlplane

// review18-cor F1's repro, kept as a regression test: the denials view
// named a caller's service by the caller's address before its
// (mTLS-authenticated) principal, and knew no workload-only callers.

import (
	"testing"

	"github.com/trustmesh/trustmesh/authz/access"
	"github.com/trustmesh/trustmesh/mesh"
)

func exampleIndex(t *testing.T) *serviceIndex {
	t.Helper()
	m, err := (&mesh.Dir{Path: "../examples/mesh"}).Mesh()
	if err != nil {
		t.Fatal(err)
	}
	mat, err := access.Compute(nil, m, access.Options{})
	if err != nil {
		t.Fatal(err)
	}
	return newServiceIndex(mat, m)
}

func TestReviewCorDenialServices(t *testing.T) {
	idx := exampleIndex(t)
	// demo/client (a workload with no service, on 127.0.0.1 like echo)
	// is denied calling echo: the access view calls it "demo/client".
	if got := idx.name("127.0.0.1", "spiffe://cluster.local/ns/demo/sa/client"); got != "demo/client" {
		t.Errorf("from_service of demo/client's denial = %q, want demo/client (the access view's ID)", got)
	}
	// A stranger on the host is named after echo too.
	if got := idx.name("127.0.0.1", "spiffe://cluster.local/ns/other/sa/stranger"); got != "" {
		t.Errorf("from_service of an unknown identity = %q, want \"\"", got)
	}
}

// TestDenialServicesPrincipalFirst: the destination is named by its
// principal too, whatever the address; the address names a side only
// when there is no principal.
func TestDenialServicesPrincipalFirst(t *testing.T) {
	idx := exampleIndex(t)
	for _, tt := range []struct{ addr, principal, want string }{
		{"127.0.0.1", "spiffe://cluster.local/ns/demo/sa/echo", "demo/echo"},
		{"10.9.9.9", "spiffe://cluster.local/ns/demo/sa/echo", "demo/echo"}, // a reused or unknown address
		{"10.9.9.9", "spiffe://cluster.local/ns/demo/sa/client", "demo/client"},
		{"127.0.0.1", "", "demo/echo"}, // plaintext: the address is all there is
		{"10.9.9.9", "", ""},
	} {
		if got := idx.name(tt.addr, tt.principal); got != tt.want {
			t.Errorf("name(%q, %q) = %q, want %q", tt.addr, tt.principal, got, tt.want)
		}
	}
}
