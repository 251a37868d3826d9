package admin_test

import (
	"context"
	"testing"

	"github.com/trustmesh/trustmesh/ca/admin"
)

// TestRotateTaint: ca rotate --taint root activates a new root at once and
// lists the old one as tainted (and in the bundle, marked tainted); an
// unknown --taint value is refused and changes nothing.
func TestRotateTaint(t *testing.T) {
	ctx := context.Background()
	e := newCAEnv(t, 0)
	before, err := admin.Rotate(ctx, e.dir, admin.JournalOptions{}, admin.RotateRequest{Step: "status"})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := admin.Rotate(ctx, e.dir, admin.JournalOptions{}, admin.RotateRequest{Step: "taint", Taint: "leaf"}); err == nil {
		t.Fatal("--taint leaf was accepted")
	}
	st, err := admin.Rotate(ctx, e.dir, admin.JournalOptions{}, admin.RotateRequest{Step: "taint", Taint: "root"})
	if err != nil {
		t.Fatal(err)
	}
	if st.Active == before.Active || st.Next != 0 {
		t.Fatalf("after --taint root: active %d (was %d), next %d; want a new active generation and nothing prepared", st.Active, before.Active, st.Next)
	}
	if len(st.Tainted) != 1 || st.Tainted[0].Role != "root" || st.Tainted[0].Serial == "" {
		t.Fatalf("tainted = %+v; want the old root", st.Tainted)
	}
	states := map[string]int{}
	for _, c := range st.CA {
		if c.Role == "root" {
			states[c.State]++
		}
	}
	if states["active"] != 1 || states["tainted"] != 1 {
		t.Fatalf("roots by state %v; want one active and one tainted", states)
	}
}
