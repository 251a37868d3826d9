package controlplane_test

import (
	"context"
	"crypto/tls"
	"encoding/json"
	"io"
	"net/http"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev3 "github.com/envoyproxy/go-control-plane/envoy/config/core/v3"
	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"

	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/ui"
)

// TestServeUIShowsRealData runs the assembled control plane with its web UI
// and reads every view: the identities it issued, its CA, the access matrix
// of its policies over its mesh, a denial it made, and its journal, which
// verify-now finds intact.
func TestServeUIShowsRealData(t *testing.T) {
	// A unix socket: the authorization service binds its port only once
	// its policies load, so a TCP port chosen here could be taken first.
	authzAddr := "unix://" + filepath.Join(t.TempDir(), "authz.sock")
	e := start(t, func(c *controlplane.Config) {
		c.Listen.UI = "127.0.0.1:0"
		c.Listen.Authz = authzAddr
		c.XDS.MeshDir = "../examples/mesh"
		c.Authz.PolicyDir = "../examples/mesh/policies"
		c.Authz.DecisionLog = io.Discard
		c.UI.Replica = "replica-a"
	})
	base := "http://" + e.cp.Addrs().UI.String()
	echoID := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/echo")
	clientID := spiffeid.RequireFromString("spiffe://cluster.local/ns/demo/sa/client")
	echo, cl := newClient(t), newClient(t)
	e.obtain(echo, e.token(echoID, time.Minute), echoID)
	e.obtain(cl, e.token(clientID, time.Minute), clientID)

	// A denied Check, as the echo service's Envoy would make it.
	w := &workload{id: echoID, c: echo}
	w.setCert()
	conn, err := grpc.NewClient(authzAddr, grpc.WithTransportCredentials(credentials.NewTLS(&tls.Config{
		ServerName: "localhost", RootCAs: rootPool(e), Certificates: []tls.Certificate{*w.cert.Load()}, Time: e.clock.Now})))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := authv3.NewAuthorizationClient(conn).Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Source: &authv3.AttributeContext_Peer{Principal: "spiffe://cluster.local/ns/demo/sa/someone"},
		Destination: &authv3.AttributeContext_Peer{Principal: echoID.String(), Labels: map[string]string{"app": "echo"}, Address: &corev3.Address{Address: &corev3.Address_SocketAddress{
			SocketAddress: &corev3.SocketAddress{Address: "127.0.0.1"}}}},
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "POST", Path: "/echo.Echo/Say?key=s3cret", Host: "echo.demo"}},
	}}, grpc.WaitForReady(true))
	if err != nil || resp.GetStatus().GetCode() == 0 {
		t.Fatalf("Check = %v, %v; want a denial", resp.GetStatus(), err)
	}

	get := func(path string, v any) {
		t.Helper()
		r, err := http.Get(base + path)
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
	var ids ui.IdentitiesView
	get("/ui/api/identities", &ids)
	got := map[string]ui.Identity{}
	for _, id := range ids.Identities {
		got[id.SPIFFEID] = id
	}
	for _, want := range []spiffeid.ID{echoID, clientID} {
		id, ok := got[want.String()]
		if !ok || id.Serial == "" || id.Status != ui.StatusOnTime || id.Expires.IsZero() {
			t.Errorf("identity %s = %+v (present %v), want on time with a serial", want, id, ok)
		}
	}
	if id := got[echoID.String()]; id.Serial != strings.ToLower(echo.chain[0].SerialNumber.Text(16)) {
		t.Errorf("echo's serial %q is not its certificate's %x", id.Serial, echo.chain[0].SerialNumber)
	}

	var ca ui.CAView
	get("/ui/api/ca", &ca)
	roles := map[string]string{}
	for _, g := range ca.Generations {
		roles[g.Role] = g.State
		if len(g.Fingerprint) != 95 || g.NotAfter.IsZero() {
			t.Errorf("generation %+v lacks a fingerprint or expiry", g)
		}
	}
	if roles["root"] != "active" || roles["intermediate"] != "active" || len(ca.NextExpiries) == 0 {
		t.Errorf("CA view = %+v, want an active root and intermediate and what expires next", ca)
	}

	var acc struct {
		PolicyVersion uint64 `json:"policy_version"`
		Services      []struct {
			ID string `json:"id"`
		} `json:"services"`
		Cells []struct {
			From, To, Verdict string
		} `json:"cells"`
	}
	get("/ui/api/access", &acc)
	verdicts := map[string]string{}
	for _, c := range acc.Cells {
		verdicts[c.From+"->"+c.To] = c.Verdict
	}
	if acc.PolicyVersion == 0 || len(acc.Services) < 2 || verdicts["demo/client->demo/echo"] != "conditional" {
		t.Errorf("access = %+v, want demo/client -> demo/echo conditional (on the health path)", acc)
	}

	var den ui.DenialsView
	deadline := time.Now().Add(10 * time.Second)
	for get("/ui/api/denials", &den); len(den.Denials) == 0 && time.Now().Before(deadline); get("/ui/api/denials", &den) {
		time.Sleep(50 * time.Millisecond)
	}
	if len(den.Denials) != 1 || !den.Logging || den.Replica != "replica-a" {
		t.Fatalf("denials = %+v, want the one denial, logging, from replica-a", den)
	}
	d := den.Denials[0]
	if d.ToService != "demo/echo" || d.FromService != "" || d.Path != "/echo.Echo/Say?key=REDACTED" || d.DecisionID == "" {
		t.Errorf("denial = %+v, want to demo/echo from no known service, its query redacted", d)
	}

	var j ui.JournalView
	get("/ui/api/journal", &j)
	if j.Size == 0 || j.Checkpoint.Size != j.Size || j.Checkpoint.RootHash == "" || !strings.Contains(j.Checkpoint.Text, "trustmesh.journal/") || j.Witness.Configured {
		t.Errorf("journal = %+v", j)
	}
	var sess ui.Session
	get("/ui/api/session", &sess)
	req, _ := http.NewRequest(http.MethodPost, base+"/ui/api/journal/verify", nil)
	req.Header.Set("Origin", base)
	req.Header.Set(ui.CSRFHeader, sess.CSRFToken)
	r, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Body.Close()
	var v ui.VerifyResult
	if err := json.NewDecoder(r.Body).Decode(&v); err != nil || r.StatusCode != 200 || !v.OK || v.Checked != j.Size {
		t.Errorf("verify: %d %+v %v, want OK over %d entries", r.StatusCode, v, err, j.Size)
	}
}
