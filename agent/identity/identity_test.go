package identity

import (
	"testing"

	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

func TestStoreNotifiesEveryChange(t *testing.T) {
	s := New()
	snap, changed := s.Load()
	if snap.Ready() || snap.Version != 0 {
		t.Fatalf("new store: %+v", snap)
	}
	b := x509bundle.New(spiffeid.RequireTrustDomainFromString("cluster.local"))
	sv := &x509svid.SVID{ID: spiffeid.RequireFromString("spiffe://cluster.local/x")}
	for i, set := range []func(){
		func() { s.SetBundle(b) },
		func() { s.SetSVID(sv) },
		func() { s.SetSVID(nil) },
	} {
		select {
		case <-changed:
			t.Fatalf("change %d: channel closed before the change", i)
		default:
		}
		set()
		select {
		case <-changed:
		default:
			t.Fatalf("change %d: channel not closed", i)
		}
		snap, changed = s.Load()
		if snap.Version != uint64(i+1) {
			t.Fatalf("change %d: version %d", i, snap.Version)
		}
	}
	if snap.Bundle != b || snap.SVID != nil || snap.Ready() {
		t.Fatalf("final snapshot %+v", snap)
	}
}
