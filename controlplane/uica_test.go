package controlplane_test

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/ui"
)

func uiGet(t *testing.T, e *env, path string, v any) {
	t.Helper()
	r, err := http.Get("http://" + e.cp.Addrs().UI.String() + path)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	b, _ := io.ReadAll(r.Body)
	if r.StatusCode != 200 {
		t.Fatalf("GET %s: %d %s", path, r.StatusCode, b)
	}
	if err := json.Unmarshal(b, v); err != nil {
		t.Fatalf("GET %s: %v: %s", path, err, b)
	}
}

// TestUICAViewThroughRotations: the CA view begins with the CA's creation,
// lists no activation of a root that was already active, keeps the
// previous intermediate as retiring while certificates it signed are
// valid, and lists the intermediate prepared under a prepared root
// (review18-cor F3, F4).
func TestUICAViewThroughRotations(t *testing.T) {
	e := start(t, func(c *controlplane.Config) { c.Listen.UI = "127.0.0.1:0" })
	ctx := context.Background()
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo")
	c := newClient(t)
	e.obtain(c, e.token(id, time.Minute), id) // signed by the first intermediate
	first := c.chain[1].SerialNumber.Text(16)
	root := e.cp.Authority().Current().Anchor

	var ca ui.CAView
	uiGet(t, e, "/ui/api/ca", &ca)
	if len(ca.Events) == 0 || ca.Events[0].Kind != "create" || !strings.Contains(ca.Events[0].Detail, root.SerialNumber.Text(16)) {
		t.Fatalf("a fresh CA's events = %+v, want its creation", ca.Events)
	}

	rot := e.cp.Rotation()
	if err := rot.Prepare(ctx, false); err != nil {
		t.Fatal(err)
	}
	e.clock.Step(2 * time.Second) // past the cached second
	uiGet(t, e, "/ui/api/ca", &ca)
	next, err := rot.PreparedCertificates(ctx)
	if err != nil || next == nil {
		t.Fatalf("PreparedCertificates = %v, %v", next, err)
	}
	var prep *ui.Generation
	for i, g := range ca.Generations {
		if g.State == "prepared" && g.Role == "intermediate" {
			prep = &ca.Generations[i]
		}
	}
	if prep == nil || prep.Serial != next.Cert.SerialNumber.Text(16) || len(prep.Fingerprint) != 95 || !prep.NotBefore.Equal(next.Cert.NotBefore) {
		t.Errorf("the prepared intermediate is shown as %+v, want its serial %x, fingerprint and the certificate's not_before %v", prep, next.Cert.SerialNumber, next.Cert.NotBefore)
	}
	if err := rot.Activate(ctx, true); err != nil {
		t.Fatal(err)
	}
	e.clock.Step(2 * time.Second) // past the cached second
	uiGet(t, e, "/ui/api/ca", &ca)
	kinds := []string{}
	for _, ev := range ca.Events {
		kinds = append(kinds, ev.Kind+" "+strings.Fields(ev.Detail)[0])
		if ev.Kind == "activate" && strings.HasPrefix(ev.Detail, "root") {
			t.Errorf("an intermediate rotation shows the unchanged root as activated: %+v", ev)
		}
	}
	if want := "create CA,prepare intermediate,activate intermediate"; strings.Join(kinds, ",") != want {
		t.Errorf("events %q, want %q", strings.Join(kinds, ","), want)
	}
	states := map[string]string{}
	for _, g := range ca.Generations {
		states[g.Role+"/"+g.Serial] = g.State
	}
	if states["intermediate/"+first] != "retiring" {
		t.Errorf("the previous intermediate (which signed echo's valid certificate) is %q, want retiring: %+v", states["intermediate/"+first], ca.Generations)
	}

	if err := rot.Prepare(ctx, true); err != nil {
		t.Fatal(err)
	}
	e.clock.Step(2 * time.Second)
	uiGet(t, e, "/ui/api/ca", &ca)
	got := map[string]int{}
	for _, g := range ca.Generations {
		got[g.Role+"/"+g.State]++
	}
	if got["root/prepared"] != 1 || got["intermediate/prepared"] != 1 || got["root/active"] != 1 || got["intermediate/active"] != 1 {
		t.Errorf("with a root prepared, the generations are %v, want the prepared root and the intermediate under it too: %+v", got, ca.Generations)
	}

	// Once every certificate the first intermediate signed (echo's, and
	// the CA's own serving certificate) has expired, it is no longer
	// listed.
	e.clock.Step(30 * 24 * time.Hour)
	uiGet(t, e, "/ui/api/ca", &ca)
	for _, g := range ca.Generations {
		if g.Serial == first {
			t.Errorf("the first intermediate is still listed after its certificates expired: %+v", g)
		}
	}
}

// TestUIJournalHidesWitnessCredentials: the journal view shows a witness
// URL without its userinfo or query (review18-sec F2).
func TestUIJournalHidesWitnessCredentials(t *testing.T) {
	e := start(t, func(c *controlplane.Config) {
		c.Listen.UI = "127.0.0.1:0"
		c.Journal.Witness = "http://witness-user:S3cretPassw0rd@127.0.0.1:1/ckpt?api_key=TOPSECRET"
		c.Journal.WitnessKey = newWitnessKey(t)
	})
	id := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo")
	e.obtain(newClient(t), e.token(id, time.Minute), id) // a checkpoint to export
	var j ui.JournalView
	deadline := time.Now().Add(15 * time.Second)
	for uiGet(t, e, "/ui/api/journal", &j); !strings.HasPrefix(j.Witness.State, "failing") && time.Now().Before(deadline); uiGet(t, e, "/ui/api/journal", &j) {
		time.Sleep(50 * time.Millisecond)
	}
	b, _ := json.Marshal(j.Witness)
	if j.Witness.Target != "http://127.0.0.1:1/ckpt" || !strings.HasPrefix(j.Witness.State, "failing") {
		t.Errorf("witness = %s, want the target without credentials, failing", b)
	}
	for _, s := range []string{"witness-user", "S3cretPassw0rd", "TOPSECRET"} {
		if strings.Contains(string(b), s) {
			t.Errorf("the journal view shows %q: %s", s, b)
		}
	}
}
