package mesh_test

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"github.com/trustmesh/trustmesh/internal/atomicfile"
	"github.com/trustmesh/trustmesh/mesh"
	"github.com/trustmesh/trustmesh/mesh/meshtest"
)

// The contract's mesh as mesh files; see meshtest.Want.
const contractFiles = `apiVersion: mesh.trustmesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: %[1]s}
spec:
  ports: [{name: http, port: 80, protocol: HTTP}, {name: grpc-api, port: 7070, protocol: GRPC}]
  endpoints:
  - address: 10.1.0.5
    pod: web-0
    spiffeID: spiffe://cluster.local/ns/%[1]s/sa/web
    labels: {%[3]s}
    ports: {http: 8080}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Workload
metadata: {name: ingress-0, namespace: %[2]s}
spec:
  spiffeID: spiffe://cluster.local/ns/%[2]s/sa/ingress
  labels: {istio: ingressgateway}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: Gateway
metadata: {name: ingress, namespace: %[2]s}
spec:
  kind: ingress
  selector: {istio: ingressgateway}
  servers:
  - port: 8443
    hosts: [%[1]s.example.com]
    credentialName: shop-cert
    routes: [{host: %[1]s.example.com, pathPrefix: /, service: %[1]s/web, port: 80}]
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: TLSSecret
metadata: {name: shop-cert, namespace: %[2]s}
spec: {certFile: tls/cert.pem, keyFile: tls/key.pem}
---
apiVersion: mesh.trustmesh.io/v1alpha1
kind: ExternalService
metadata: {name: payments, namespace: %[1]s}
spec:
  host: api.%[1]s.example
  ports: [{name: http, port: 80, protocol: HTTP, tlsPort: 443}]
`

func TestDirKeepsTheSourceContract(t *testing.T) {
	dir := t.TempDir()
	if err := os.Mkdir(filepath.Join(dir, "tls"), 0o700); err != nil {
		t.Fatal(err)
	}
	for name, data := range map[string]string{"cert.pem": "CERT", "key.pem": "KEY"} {
		if err := os.WriteFile(filepath.Join(dir, "tls", name), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write := func(t *testing.T, v meshtest.Version, n meshtest.Names) {
		labels := "app: web"
		if v >= meshtest.Relabelled {
			labels += ", version: v2"
		}
		data := fmt.Sprintf(contractFiles, n.App, n.Gateway, labels)
		if err := atomicfile.WriteFile(filepath.Join(dir, "mesh.yaml"), []byte(data), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	meshtest.Run(t, &mesh.Dir{Path: dir}, meshtest.Names{App: "shop", Gateway: "istio-system"}, write)
}
