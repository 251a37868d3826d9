package controlplane_test

import (
	"reflect"
	"testing"

	"github.com/trustmesh/trustmesh/controlplane"
)

// TestControlPlaneExportsNoInternals keeps the control plane's parts (the
// CA, its authority, the journal) to itself: callers outside reach them
// over the wire or through ca/admin, as operators do.
func TestControlPlaneExportsNoInternals(t *testing.T) {
	typ := reflect.TypeFor[controlplane.ControlPlane]()
	for f := range typ.Fields() {
		if f.IsExported() {
			t.Errorf("ControlPlane exports its field %s (%s)", f.Name, f.Type)
		}
	}
}
