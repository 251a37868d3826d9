package xds_test

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spiffe/go-spiffe/v2/spiffeid"

	"github.com/trustmesh/trustmesh/authz/source"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/xds"
	"github.com/trustmesh/trustmesh/xds/proxyconfig"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/")

func goldenRequest(node string, proxyless bool) xds.DumpRequest {
	return goldenRequestIn("testdata/mesh", node, proxyless)
}

func goldenRequestIn(meshDir, node string, proxyless bool) xds.DumpRequest {
	return xds.DumpRequest{
		Mesh:     &mesh.Dir{Path: meshDir},
		Policies: &source.Dir{Path: "testdata/policies", DefaultNamespace: "default"},
		Proxy: proxyconfig.Config{
			TrustDomain: td, AuthzHost: "trustmesh.trustmesh-system.svc", AuthzPort: 9191,
			AuthzID: spiffeid.RequireFromString("spiffe://cluster.local/ns/trustmesh-system/sa/trustmesh"),
		},
		NodeID: node, Proxyless: proxyless,
	}
}

// TestGolden compares the resources of a sidecar, an ingress gateway, an
// egress gateway and a proxyless client of testdata/mesh, and of a sidecar
// among ambient pods (testdata/ambient: HBONE out to ambient services,
// HBONE accepted on 15008), with the files in testdata/. Run with -update
// to refresh them, and review the diff like code.
func TestGolden(t *testing.T) {
	cases := []struct {
		file      string
		node      string
		proxyless bool
		mesh      string
	}{
		{"sidecar.golden.json", "sidecar~10.0.1.1~productpage-v1-0.bookinfo~bookinfo.svc.cluster.local", false, ""},
		{"ingress.golden.json", "router~10.0.9.1~istio-ingressgateway-0.istio-system~istio-system.svc.cluster.local", false, ""},
		{"egress.golden.json", "router~10.0.9.2~istio-egressgateway-0.istio-system~istio-system.svc.cluster.local", false, ""},
		{"proxyless.golden.json", "sidecar~10.0.3.1~ratings-v1-0.bookinfo~bookinfo.svc.cluster.local", true, ""},
		{"mixed.golden.json", "sidecar~10.2.0.1~api-0.shop~shop.svc.cluster.local", false, "testdata/ambient"},
	}
	for _, tc := range cases {
		t.Run(tc.file, func(t *testing.T) {
			req := goldenRequest(tc.node, tc.proxyless)
			if tc.mesh != "" {
				req = goldenRequestIn(tc.mesh, tc.node, tc.proxyless)
			}
			got, err := xds.Dump(req)
			if err != nil {
				t.Fatal(err)
			}
			path := filepath.Join("testdata", tc.file)
			if *update {
				if err := os.WriteFile(path, got, 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			want, err := os.ReadFile(path)
			if err != nil {
				t.Fatalf("%v (run with -update to create it)", err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("%s differs from the generated resources; run go test ./xds -run TestGolden -update and review the diff", path)
			}
		})
	}
}

// TestDumpRedactsKeys: the ingress gateway's dump shows its certificate
// but never its private key.
func TestDumpRedactsKeys(t *testing.T) {
	got, err := xds.Dump(goldenRequest("router~10.0.9.1~istio-ingressgateway-0.istio-system~istio-system.svc.cluster.local", false))
	if err != nil {
		t.Fatal(err)
	}
	key, err := os.ReadFile("testdata/mesh/certs/bookinfo.key")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(got), "PRIVATE KEY") || bytes.Contains(got, key) || !strings.Contains(string(got), "[redacted]") {
		t.Fatal("the dump shows a private key")
	}
	if !strings.Contains(string(got), "kubernetes://istio-system/bookinfo-cert") {
		t.Fatal("the dump lacks the gateway's secret")
	}
}

func TestMeshDirRefusesPermissive(t *testing.T) {
	m, err := (&mesh.Dir{Path: "testdata/mesh"}).Mesh()
	if err != nil {
		t.Fatal(err)
	}
	if len(m.Refusals) != 1 || !strings.Contains(m.Refusals[0].String(), "PERMISSIVE") {
		t.Fatalf("refusals = %v, want the PERMISSIVE PeerAuthentication", m.Refusals)
	}
	if err := m.Validate(td); err != nil {
		t.Fatal(err)
	}
}
