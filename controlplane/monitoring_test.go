package controlplane_test

import (
	"context"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/trustmesh/trustmesh/ca/admin"
	"github.com/trustmesh/trustmesh/check"
	"github.com/trustmesh/trustmesh/controlplane"
	"github.com/trustmesh/trustmesh/xds"
)

// TestDebugEndpointsOff: with NoDebugEndpoints (serve --debug-endpoints=false,
// as the Helm chart runs it) the monitoring port does not list the xDS
// clients, which name every meshed pod, its address and SPIFFE ID; it
// answers 404 and says why, and trustmesh check reports that as
// information naming the flag rather than as a failure. Health and metrics
// are served as before; with the endpoints on, the clients are listed.
func TestDebugEndpointsOff(t *testing.T) {
	get := func(t *testing.T, url string) (int, string) {
		t.Helper()
		resp, err := http.Get(url)
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return resp.StatusCode, string(b)
	}
	for _, off := range []bool{true, false} {
		e := start(t, func(c *controlplane.Config) {
			c.XDS.MeshDir = "../examples/mesh"
			c.Listen.Authz = "off"
			c.Listen.NoDebugEndpoints = off
		})
		mon := "http://" + e.cp.Addrs().Monitoring.String()
		code, body := get(t, mon+xds.ClientsPath)
		switch {
		case off && (code != http.StatusNotFound || strings.Contains(body, "clients") || !strings.Contains(body, "--debug-endpoints")):
			t.Errorf("off: %s answered %d %q; want 404 naming --debug-endpoints", xds.ClientsPath, code, body)
		case !off && code != http.StatusOK:
			t.Errorf("on: %s answered %d %q; want the clients", xds.ClientsPath, code, body)
		}
		if code, _ := get(t, mon+"/metrics"); code != http.StatusOK {
			t.Errorf("off=%v: /metrics answered %d", off, code)
		}
		rep, err := check.Run(context.Background(), check.Config{DataDir: admin.DataDir(e.dataDir),
			Monitoring: e.cp.Addrs().Monitoring.String(), Now: e.clock.Now()})
		if err != nil {
			t.Fatal(err)
		}
		var found bool
		for _, f := range rep.Findings {
			if f.Code != check.CodeXDSClients {
				continue
			}
			found = true
			if off && (f.Severity != check.Info || !strings.Contains(f.Hint, "--debug-endpoints") || !strings.Contains(f.Message, "debug endpoints are off")) {
				t.Errorf("off: check says %s %q (hint %q); want information naming --debug-endpoints", f.Severity, f.Message, f.Hint)
			}
			if !off && f.Severity != check.OK {
				t.Errorf("on: check says %s %q; want ok", f.Severity, f.Message)
			}
		}
		if !found {
			t.Errorf("off=%v: no %s finding in %+v", off, check.CodeXDSClients, rep.Findings)
		}
		if err := e.stop(); err != nil {
			t.Fatal(err)
		}
	}
}
